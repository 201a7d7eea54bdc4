"""Scaling a running cluster as Kubernetes would: the controller follows the release's
StatefulSets through the Kubernetes API (`--discovery kubernetes`), the gateway finds the
attention instances through the controller, and scaling either role re-forms the cluster
without restarting the processes that stay.

Real processes (controller, attention and FFN instances, gateway), the official `openai` and
`kubernetes` clients; kmock's emulator stands in for the API server (none can run here), and
the test plays the StatefulSet controller: it patches `spec.replicas`, then starts the new
pod's process or stops the removed one's. Greedy decoding: every answer, before and after
each scale (the FFN side re-sharding its experts included), must be exactly the first one."""

from __future__ import annotations

import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from services.common.control_client import ControlClient
from tests.support.cluster import CLUSTER_SECRET, afd
from tests.support.gateway import start_gateway
from tests.support.kube_api import NAMESPACE, SELECTOR, KubeAPI
from tests.support.processes import Child

PROMPTS = [f"Scaling request {i} counts: {i}, {i + 1}," for i in range(8)]
MAX_TOKENS = 12
INSTANCE = ("--dtype", "float32", "--step-timeout", "10", "--metrics-port", "0")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("afd-scaling") / "tiny"
    assert afd("init-checkpoint", str(path), "--preset", "tiny").wait(120) == 0
    return path


def start(*args: str, env: dict[str, str] | None = None) -> Child:
    return Child(afd(*args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))


class Scene:
    """The cluster under test and the API it is deployed through."""

    def __init__(self, api: KubeAPI, checkpoint: Path, tmp_path: Path) -> None:
        self.api, self.checkpoint = api, checkpoint
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        self.controller = start(
            "controller", "--port", "0", "--store-port", "0", "--model", str(checkpoint),
            "--discovery", "kubernetes", "--kube-namespace", NAMESPACE,
            "--kube-selector", SELECTOR, "--member-timeout", "30",
            env={"KUBECONFIG": str(kubeconfig)},
        )  # fmt: skip
        self.address = self.controller.wait_for(r"controller listening on (\S+)").group(1)
        self.control = ControlClient(self.address, secret=CLUSTER_SECRET)
        self.members: dict[tuple[str, int], Child] = {}

    def add(self, role: str, index: int) -> Child:
        """The pod (role, index) starts: its object, then its process."""
        self.api.pod(role, index, "127.0.0.1")
        child = start(
            role, "--index", str(index), "--controller", self.address,
            "--model", str(self.checkpoint), *INSTANCE,
        )  # fmt: skip
        self.members[(role, index)] = child
        return child

    def remove(self, role: str, index: int) -> None:
        """The pod (role, index) is stopped (SIGTERM: it drains and leaves), then deleted."""
        assert self.members.pop((role, index)).stop() == 0
        self.api.delete_pod(role, index)

    def wait_for_epoch(self, num_attention: int, num_ffn: int, timeout_s: float = 120) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.control.state()
            m = state.membership
            if m is not None and m.epoch == state.epoch:
                if (len(m.attention_ranks), len(m.ffn_ranks)) == (num_attention, num_ffn):
                    return state.epoch
            time.sleep(0.2)
        raise AssertionError(f"no epoch of {num_attention}A{num_ffn}F: {self.control.state()}")

    def close(self) -> None:
        for child in self.members.values():
            child.stop()
        self.controller.stop()
        self.control.close()


def routed_instances(gateway_url: str) -> int:
    """Attention instances the gateway routes to (one concurrency limit each)."""
    text = httpx.get(gateway_url + "/metrics").text
    return len(re.findall(r"^afd_gateway_concurrency_limit\{", text, re.M))


def wait_until(condition, timeout_s: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def generation_tokens(child: Child) -> float:
    port = child.wait_for(r"metrics on \S+:(\d+)").group(1)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    match = re.search(r"^afd_attention_generation_tokens_total (\S+)", text, re.M)
    return float(match.group(1)) if match else 0.0


def answers(gateway_url: str) -> list[str]:
    """Every prompt's greedy answer, asked at once. A new client each round: a connection kept
    alive through a long scale would race the server closing it (a reset, not an answer)."""
    client = openai.OpenAI(base_url=gateway_url + "/v1", api_key="-", max_retries=0)

    def one(prompt: str) -> str:
        reply = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        return reply.choices[0].text

    with client, ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


def test_scaling_attention_and_ffn_reforms_the_cluster_and_keeps_every_answer(checkpoint, tmp_path):
    with KubeAPI() as api:
        api.statefulset("attention", 1)
        api.statefulset("ffn", 1)
        scene = Scene(api, checkpoint, tmp_path)
        gateway = None
        try:
            for role in ("ffn", "attention"):
                scene.add(role, 0)
            for child in scene.members.values():
                child.wait_for(r"serving on")
            stayers = {slot: child.process.pid for slot, child in scene.members.items()}
            gateway = start_gateway(
                "--model", str(checkpoint), "--controller", scene.address,
                "--tpot-sla-ms", "1000000",
            )  # fmt: skip
            wait_until(lambda: routed_instances(gateway.url) == 1, what="the gateway's instance")
            first = answers(gateway.url)
            assert all(first)

            # Attention 1 -> 2: the gateway routes to the new instance too.
            api.scale("attention", 2)
            scene.add("attention", 1).wait_for(r"serving on")
            scene.wait_for_epoch(2, 1)
            wait_until(lambda: routed_instances(gateway.url) == 2, what="the gateway's 2")
            assert answers(gateway.url) == first
            assert generation_tokens(scene.members[("attention", 1)]) > 0, "never routed to"

            # FFN 1 -> 2: ffn 0 re-shards its experts (half of them now).
            api.scale("ffn", 2)
            scene.add("ffn", 1).wait_for(r"serving on")
            scene.wait_for_epoch(2, 2)
            scene.members[("ffn", 0)].wait_for(r"re-sharding for 2 FFN instances")
            assert answers(gateway.url) == first

            # FFN 2 -> 1 and attention 2 -> 1: the removed pods drain, leave and go.
            api.scale("ffn", 1)
            scene.remove("ffn", 1)
            scene.wait_for_epoch(2, 1)
            api.scale("attention", 1)
            scene.remove("attention", 1)
            scene.wait_for_epoch(1, 1)
            wait_until(lambda: routed_instances(gateway.url) == 1, what="the gateway's 1")
            assert answers(gateway.url) == first

            for slot, pid in stayers.items():
                child = scene.members[slot]
                assert child.process.pid == pid and child.process.poll() is None, slot
        finally:
            if gateway is not None:
                gateway.stop()
            scene.close()
