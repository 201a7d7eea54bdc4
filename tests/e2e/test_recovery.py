"""The local stack survives its processes dying, as a cluster would: kill -9 an FFN or an
attention instance while streaming requests run, and drain on SIGTERM. Real processes
(`afd serve`, which restarts what dies), the official `openai` client, greedy decoding, so
every surviving request must end with exactly the text it would have had anyway."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from services.common.wire.attention_client import AttentionClient
from tests.support.cluster import CLUSTER_SECRET, Cluster, afd, wait_until_gone
from tests.support.processes import pid_of

STEP_TIMEOUT_S = 3
CLIENT_TIMEOUT_S = 90  # a client that hears nothing for this long has hung: the test fails
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("afd-recovery") / "tiny"
    assert afd("init-checkpoint", str(path), "--preset", "tiny").wait() == 0
    return path


def serve(checkpoint: Path, attention: int, ffn: int, *extra: str) -> Cluster:
    return Cluster(
        "--model", str(checkpoint), "--attention-instances", str(attention),
        "--ffn-instances", str(ffn), "--dtype", "float32",
        "--step-timeout", str(STEP_TIMEOUT_S), "--tpot-sla-ms", "1000000", *extra,
        gateway=True,
    )  # fmt: skip


@contextlib.contextmanager
def serving(checkpoint: Path, attention: int, ffn: int, *extra: str) -> Iterator[Cluster]:
    """`serve`, and afterwards: `afd serve` exits 0 and leaves no process behind."""
    cluster = serve(checkpoint, attention, ffn, *extra)
    try:
        yield cluster
    finally:
        assert cluster.stop() == 0
    assert wait_until_gone(str(checkpoint)) == []


def client_of(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=cluster.gateway_url + "/v1", api_key="-", max_retries=0, timeout=CLIENT_TIMEOUT_S
    )


PROMPTS = [f"Request {i} asks the model to count: {i}, {i + 1}," for i in range(32)]


@dataclass
class Streamed:
    """One streamed completion as the client saw it."""

    text: str = ""
    chunks: int = 0
    error: str | None = None
    finish_reason: str | None = None
    started: threading.Event = field(default_factory=threading.Event)


def stream(client: openai.OpenAI, prompt: str, out: Streamed) -> Streamed:
    try:
        for chunk in client.completions.create(
            model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        ):  # fmt: skip
            choice = chunk.choices[0]
            out.text += choice.text
            out.chunks += 1
            out.finish_reason = choice.finish_reason or out.finish_reason
            out.started.set()
    except openai.APIError as err:
        out.error = str(err)
    except httpx.HTTPError as err:  # the connection broke mid-stream (the gateway died)
        out.error = repr(err)
    finally:
        out.started.set()
    return out


def stream_all(client: openai.OpenAI, prompts: list[str], kill=None) -> list[Streamed]:
    """Every prompt at once; `kill()` runs once every stream has its first chunk."""
    outs = [Streamed() for _ in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(stream, client, p, o) for p, o in zip(prompts, outs, strict=True)]
        if kill is not None:
            for out in outs:
                assert out.started.wait(CLIENT_TIMEOUT_S), "a stream never started"
            kill()
        for future in futures:
            future.result(timeout=CLIENT_TIMEOUT_S + 30)  # raises if a client hung
    return outs


def killed_mid_stream(
    cluster: Cluster, checkpoint: Path, prompts: list[str], *who: str
) -> tuple[list[Streamed], list[Streamed]]:
    """The prompts streamed undisturbed (the reference), then again with the process whose
    command line holds `who` killed (SIGKILL) once every stream has begun."""
    client = client_of(cluster)
    reference = stream_all(client, prompts)
    victim = pid_of(*who, str(checkpoint))
    return reference, stream_all(client, prompts, kill=lambda: os.kill(victim, signal.SIGKILL))


def said_within(cluster: Cluster, text: str, seconds: float) -> bool:
    """Whether `afd serve` printed a line holding `text` within `seconds`."""
    deadline = time.monotonic() + seconds
    while not any(text in line for line in cluster.lines):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def answers_within(url: str, seconds: float) -> bool:
    """Whether `url` answers 200 within `seconds` (a restarting process binds it again)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def served_within(client: openai.OpenAI, seconds: float) -> float:
    """Seconds until a new request is answered in full (fails after `seconds`)."""
    start = time.monotonic()
    while True:
        out = stream(client, "a new request", Streamed())
        if out.error is None and out.finish_reason == "length":
            return time.monotonic() - start
        assert time.monotonic() - start < seconds, f"not served within {seconds} s: {out.error}"
        time.sleep(0.5)


def test_killing_an_ffn_instance_mid_stream_loses_no_request(checkpoint):
    with serving(checkpoint, 1, 2) as cluster:
        reference, outs = killed_mid_stream(cluster, checkpoint, PROMPTS, "ffn --index 1")
        assert all(r.error is None and r.finish_reason == "length" for r in reference)
        assert [o.error for o in outs] == [None] * len(PROMPTS)
        assert [o.text for o in outs] == [r.text for r in reference]  # nothing lost or redone
        assert all(o.chunks > 1 for o in outs)
        assert any("ffn instance 1 exited with code -9; restarting it" in x for x in cluster.lines)
        assert any("epoch 2 formed" in line for line in cluster.lines)
        served_within(client_of(cluster), 30)


def test_killing_one_process_of_an_ffn_instance_of_two_loses_no_request(checkpoint):
    # Two attention instances enter the FFN instance at a process each (a % 2): the killed
    # process is attention instance 1's door, and its partner computes half the experts.
    with serving(checkpoint, 2, 1, "--gpus-per-ffn-instance", "2") as cluster:
        reference, outs = killed_mid_stream(cluster, checkpoint, PROMPTS[:16], "ffn --index 1")
        assert all(r.error is None and r.finish_reason == "length" for r in reference)
        assert [o.error for o in outs] == [None] * 16
        assert [o.text for o in outs] == [r.text for r in reference]
        assert any(
            "ffn instance 0 process 1 exited with code -9; restarting it" in x
            for x in cluster.lines
        )
        assert any("epoch 2 formed" in line for line in cluster.lines)
        served_within(client_of(cluster), 30)


def test_killing_an_attention_instance_ends_its_requests_clearly_and_the_rest_go_on(checkpoint):
    with serving(checkpoint, 2, 1) as cluster:
        reference, outs = killed_mid_stream(
            cluster, checkpoint, PROMPTS[:16], "attention --index 1"
        )
        survived = [o for o in outs if o.error is None]
        lost = [o for o in outs if o.error is not None]
        assert survived and lost, "the router spreads requests over both instances"
        for out, ref in zip(outs, reference, strict=True):
            if out.error is None:
                assert out.text == ref.text and out.finish_reason == "length"
            else:  # it had streamed from the dead instance: it ends, and says why
                assert "attention instance is unavailable" in out.error, out.error
                assert ref.text.startswith(out.text)
        # New requests go to the live instance at once, and to both once the dead one is back.
        assert served_within(client_of(cluster), 10) < 10
        assert any("attention instance 1 exited with code -9" in x for x in cluster.lines)


def test_restarting_the_controller_or_the_gateway_loses_nothing_admitted(checkpoint, tmp_path):
    targets = tmp_path / "targets.json"
    with serving(checkpoint, 1, 1, "--prometheus-targets", str(targets)) as cluster:
        # The controller: busy steps never wait for it, so the streams go on while it is
        # down; every member joins the restarted controller's first epoch.
        prompts = PROMPTS[:8]
        reference, outs = killed_mid_stream(cluster, checkpoint, prompts, "services.cli controller")
        assert [o.error for o in outs] == [None] * len(prompts)
        assert [o.text for o in outs] == [r.text for r in reference]
        # The streams may end before the supervisor has seen the controller die: wait.
        assert said_within(cluster, "controller exited with code -9; restarting it", 30)
        # Restarted on its metrics port too: the targets written at start still hold.
        for target in json.loads(targets.read_text()):
            url = f"http://{target['targets'][0]}/metrics"
            assert answers_within(url, 30), target["labels"]
        # The gateway: its clients lose their connections, so the attention instance ends
        # their requests (no KV block stays taken), and the restarted gateway, on the same
        # address, serves new ones.
        client = client_of(cluster)
        gateway = pid_of("services.cli gateway", str(checkpoint))
        outs = stream_all(client, prompts, kill=lambda: os.kill(gateway, signal.SIGKILL))
        assert all(o.error is not None or o.finish_reason == "length" for o in outs)
        served_within(client, 30)
        with grpc.insecure_channel(cluster.addresses[0]) as channel:
            attention = AttentionClient(channel, CLUSTER_SECRET)
            deadline = time.monotonic() + 10
            while (load := attention.load()).num_running + load.num_waiting > 0:
                assert time.monotonic() < deadline, f"requests left running: {load}"
                time.sleep(0.2)
            assert load.num_free_blocks == load.num_total_blocks


def test_sigterm_drains_the_requests_in_flight_then_every_process_exits(checkpoint):
    cluster = serve(checkpoint, 1, 1, "--drain-timeout", "60")
    client = client_of(cluster)
    stopped: list[int] = []

    def sigterm() -> None:
        threading.Thread(target=lambda: stopped.append(cluster.stop(120)), daemon=True).start()

    outs = stream_all(client, PROMPTS[:8], kill=sigterm)
    assert [(o.error, o.finish_reason) for o in outs] == [(None, "length")] * 8, "".join(
        cluster.lines[-40:]
    )
    deadline = time.monotonic() + 120
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stopped == [0]
    assert wait_until_gone(str(checkpoint)) == []
    assert not any("Traceback" in line for line in cluster.lines), "".join(cluster.lines[-30:])
