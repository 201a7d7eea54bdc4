"""A real disaggregated cluster (controller, attention and FFN processes over gloo) gives
exactly the single-process engine's tokens, and its logprobs, for every M:N and
micro-batch count; and it stops without leaving a process behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from services.attention.builder import local_engine
from services.attention.engine import EngineConfig
from services.attention.scheduler import SchedulerConfig
from services.common.cluster_config import ClusterConfig
from services.common.config import load_config
from services.common.control_client import ControlClient
from services.common.model.build import load_model
from services.common.sampling_params import SamplingParams
from services.common.tokenizer import Tokenizer
from services.common.wire.attention_client import AttentionClient
from services.gateway.structured import grammar_for
from tests.support.cluster import CLUSTER_SECRET, Cluster, afd, wait_until_gone
from tests.support.models import a2f_bytes_per_token
from tests.support.processes import Child, pid_of

SERVING = health_pb2.HealthCheckResponse.SERVING
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, logprobs=2, ignore_eos=True)
FP8_LOGPROB_TOLERANCE = 0.25  # e4m3 keeps 3 mantissa bits: ~6% per activation
BUDGET = 64  # tokens per step: the longer prompts are prefilled in several chunks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("afd-cluster") / "tiny"
    assert afd("init-checkpoint", str(path), "--preset", "tiny", "--seed", "3").wait() == 0
    return path


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(128000) for _ in range(n)] for n in (3, 17, 40, 90, 9, 130)]


@pytest.fixture(scope="module")
def expected(checkpoint, prompts):
    model = load_model(checkpoint, dtype="float32", progress=False)
    config = EngineConfig(scheduler=SchedulerConfig(max_num_batched_tokens=BUDGET))
    return local_engine(model, config).generate(prompts, PARAMS)


def serve(checkpoint: Path, m: int, n: int, k: int, *extra: str) -> Cluster:
    return Cluster(
        "--model", str(checkpoint), "--attention-instances", str(m), "--ffn-instances", str(n),
        "--micro-batches", str(k), "--dtype", "float32",
        "--max-num-batched-tokens", str(BUDGET), *extra,
    )


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("m", [1, 2])
def test_disaggregated_equals_single_process(checkpoint, prompts, expected, m, n, k):
    cluster = serve(checkpoint, m, n, k)
    try:
        results = cluster.generate_all(prompts, PARAMS)
    finally:
        code = cluster.stop()
    for result, reference in zip(results, expected, strict=True):
        assert result.token_ids == reference.token_ids
        assert result.finish_reason == "length"
        torch.testing.assert_close(
            torch.tensor(result.logprobs),
            torch.tensor([entry.logprob for entry in reference.logprobs]),
            rtol=0,
            atol=1e-4,
        )
    assert code == 0
    assert wait_until_gone(str(checkpoint)) == []


@pytest.mark.parametrize(
    ("m", "n", "extra"),
    [(2, 2, ["--ffn-layout", "replicated"]), (1, 2, ["--gpus-per-ffn-instance", "2"])],
    ids=["replicated-layout", "ffn-instances-of-2"],
)
def test_other_ffn_topologies_give_the_same_tokens(checkpoint, prompts, expected, m, n, extra):
    cluster = serve(checkpoint, m, n, 3, *extra)
    try:
        results = cluster.generate_all(prompts, PARAMS)
    finally:
        assert cluster.stop() == 0
    assert [r.token_ids for r in results] == [e.token_ids for e in expected]
    if "--gpus-per-ffn-instance" in extra:
        assert sum("ffn instance 1 process 1 serving on" in x for x in cluster.lines) == 1


def test_prompt_logprobs_and_grammars_hold_across_the_pipeline(checkpoint, prompts):
    """Scored prompts (chunked, split over micro-batches) and grammar-held outputs through
    a disaggregated cluster equal the single-process engine's."""
    tokenizer = Tokenizer.from_dir(checkpoint)
    model = load_model(checkpoint, dtype="float32", progress=False)
    config = EngineConfig(scheduler=SchedulerConfig(max_num_batched_tokens=BUDGET))
    grammar = grammar_for({"type": "json_object"}, thinking=False, think_end_id=None)
    params = SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=0, grammar=grammar)
    expected = local_engine(model, config, tokenizer).generate(prompts, params)
    cluster = serve(checkpoint, 2, 2, 3)
    try:
        results = cluster.generate_all(prompts, params)
    finally:
        assert cluster.stop() == 0
    for result, reference in zip(results, expected, strict=True):
        assert result.token_ids == reference.token_ids and reference.text.startswith("{")
        torch.testing.assert_close(
            torch.tensor(result.prompt_logprobs),
            torch.tensor([lp.logprob for lp in reference.prompt_logprobs]),
            rtol=0,
            atol=1e-4,
        )


def test_fp8_dispatch_serves_and_stays_close(checkpoint, prompts, expected):
    cluster = serve(checkpoint, 1, 2, 3, "--fp8-dispatch")
    try:
        results = cluster.generate_all(prompts, PARAMS)
    finally:
        assert cluster.stop() == 0
    # e4m3 activations move the logits a little, enough to flip the random model's
    # near-ties, so tokens may differ; the best first token's logprob barely moves.
    for result, reference in zip(results, expected, strict=True):
        assert len(result.token_ids) == PARAMS.max_tokens
        assert abs(result.logprobs[0] - reference.logprobs[0].logprob) < FP8_LOGPROB_TOLERANCE


def test_the_cluster_s_facts_given_to_the_controller_alone_reach_every_instance(
    checkpoint, prompts, expected
):
    """Micro-batches, token budget, FP8 dispatch and FFN layout are flags of the controller
    only; attention and FFN instances started without them serve with them."""
    facts = ClusterConfig(2, BUDGET, fp8_dispatch=True, ffn_layout="replicated")
    controller = Child(afd(
        "controller", "--attention-instances", "1", "--ffn-instances", "2",
        "--model", str(checkpoint), "--micro-batches", "2",
        "--max-num-batched-tokens", str(BUDGET), "--fp8-dispatch", "--ffn-layout", "replicated",
        stdout=subprocess.PIPE,
    ))  # fmt: skip
    instances: list[Child] = []
    try:
        address = controller.wait_for(r"controller listening on (\S+)")[1]
        instance = ["--controller", address, "--model", str(checkpoint), "--dtype", "float32"]
        attention = Child(afd(
            "attention", "--index", "0", *instance, "--metrics-port", "0",
            stdout=subprocess.PIPE,
        ))  # fmt: skip
        instances = [attention] + [
            Child(afd("ffn", "--index", str(i), *instance, stdout=subprocess.PIPE))
            for i in range(2)
        ]
        serving = attention.wait_for(r"serving on (\S+)")[1]
        metrics = attention.wait_for(r"metrics on (\S+)")[1]
        with ControlClient(address, secret=CLUSTER_SECRET) as client:
            assert client.state().membership.config == facts
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(generate, [serving] * len(prompts), prompts, range(len(prompts))))
        steps = attention_batch_tokens(metrics)
        carried = data_plane_bytes(metrics)
        shut_down(address, instances)
    finally:
        for child in instances:
            child.stop()
        controller.stop()
    for (token_ids, logprobs), reference in zip(results, expected, strict=True):
        assert len(token_ids) == PARAMS.max_tokens
        assert abs(logprobs[0] - reference.logprobs[0].logprob) < FP8_LOGPROB_TOLERANCE
    # The prompts' 289 tokens were prefilled in steps of at most the controller's budget.
    assert steps["+Inf"] == steps[str(float(BUDGET))] and steps["+Inf"] > 289 // BUDGET
    # Every computed token went through every layer to both FFN instances, e4m3 with a scale
    # (and its routing in MoE layers), and came back as two float32 partial sums per layer.
    cfg = load_config(checkpoint)
    tokens = steps["sum"]
    per_token = a2f_bytes_per_token(cfg, torch.float32, fp8=True)
    assert carried[("a2f", "sent")] == tokens * 2 * per_token
    assert carried[("f2a", "received")] == tokens * 2 * cfg.num_hidden_layers * cfg.hidden_size * 4
    assert carried[("a2f", "received")] == carried[("f2a", "sent")] == 0


def test_instances_stop_when_the_controller_comes_back_with_other_facts(checkpoint):
    """A controller's facts are fixed for its life. Restarted with others, it would hand the
    instances a pipeline and a token budget they were not built for: each stops instead,
    naming what changed, to be started again with them."""

    def controller(*argv: str) -> Child:
        return Child(afd(
            "controller", "--attention-instances", "1", "--ffn-instances", "1",
            "--model", str(checkpoint), *argv, stdout=subprocess.PIPE,
        ))  # fmt: skip

    first = controller("--micro-batches", "3")
    members: list[Child] = []
    second = None
    try:
        address = first.wait_for(r"controller listening on (\S+)")[1]
        members = [
            Child(afd(
                role, "--index", "0", "--controller", address, "--model", str(checkpoint),
                "--dtype", "float32", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            ))  # fmt: skip
            for role in ("attention", "ffn")
        ]
        for member in members:
            member.wait_for("serving on")
        first.process.kill()
        first.process.wait(10)
        second = controller("--port", address.rsplit(":", 1)[1], "--micro-batches", "1")
        for member in members:
            member.wait_for(r"the cluster's num_micro_batches from 3 to 1 .* start it again")
            assert member.process.wait(30) != 0
    finally:
        for child in [*members, first, *([second] if second else [])]:
            child.stop()


def reformed(controller: str, epoch: int, timeout_s: float = 120.0) -> None:
    """Wait until the cluster has formed `epoch` (or a later one) and every attention
    instance serves again."""
    deadline = time.monotonic() + timeout_s
    with ControlClient(controller, secret=CLUSTER_SECRET) as client:
        while True:
            state = client.state()
            formed = state.membership
            if formed is not None and formed.epoch >= epoch and state.epoch == formed.epoch:
                break
            assert time.monotonic() < deadline, f"epoch {epoch} did not form"
            time.sleep(0.2)
    for member in formed.members:
        if member.role == "attention":
            with grpc.insecure_channel(member.address) as channel:
                grpc.channel_ready_future(channel).result(timeout=timeout_s)
                health = health_pb2_grpc.HealthStub(channel)
                while health.Check(health_pb2.HealthCheckRequest()).status != SERVING:
                    assert time.monotonic() < deadline, f"{member.address} does not serve"
                    time.sleep(0.2)


def shut_down(controller: str, members: list[Child]) -> None:
    """The controller shuts the cluster down: every member stops on its own, cleanly (a
    SIGTERM now could land mid-exit)."""
    with ControlClient(controller, secret=CLUSTER_SECRET) as client:
        client.shutdown()
    assert [child.process.wait(60) for child in members] == [0] * len(members)


def generate(address: str, prompt: list[int], i: int) -> tuple[list[int], list[float]]:
    with grpc.insecure_channel(address) as channel:
        ids, logprobs = [], []
        client = AttentionClient(channel, CLUSTER_SECRET)
        for output in client.generate(f"req-{i}", prompt, PARAMS):
            ids += output.new_token_ids
            logprobs += [entry.logprob for entry in output.new_logprobs]
        return ids, logprobs


def attention_batch_tokens(address: str) -> dict[str, float]:
    """The attention instance's steps by tokens computed: {bucket bound: steps at most it},
    and "sum": the tokens computed in all."""
    (family,) = families(address, "afd_attention_batch_tokens")
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    (total,) = [s.value for s in family.samples if s.name.endswith("_sum")]
    return {**buckets, "sum": total}


def data_plane_bytes(address: str) -> dict[tuple[str, str], float]:
    """An instance's afd_data_plane_bytes_total: {(direction, way): bytes}."""
    (family,) = families(address, "afd_data_plane_bytes")
    return {(s.labels["direction"], s.labels["way"]): s.value for s in family.samples}


def families(address: str, name: str) -> list:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return [f for f in text_string_to_metric_families(text) if f.name == name]


def test_an_instance_serving_another_model_is_refused(checkpoint, tmp_path):
    controller = afd(
        "controller", "--attention-instances", "1", "--ffn-instances", "1",
        "--fingerprint", "0123456789abcdef", stdout=subprocess.PIPE,
    )
    try:
        address = controller.stdout.readline().split()[-1]
        ffn = afd(
            "ffn", "--index", "0", "--controller", address, "--model", str(checkpoint),
            stderr=subprocess.PIPE,
        )
        _, err = ffn.communicate(timeout=120)
    finally:
        controller.terminate()
        controller.wait(30)
    assert ffn.returncode == 2
    assert "Traceback" not in err
    assert "ffn instance 0" in err and "0123456789abcdef" in err


def test_a_lone_attention_instance_idles_past_the_step_timeout(checkpoint, prompts, expected):
    """With one attention instance nothing steps while idle; the FFN instances wait for the
    next plan however long it takes, and serve it."""
    cluster = serve(checkpoint, 1, 2, 3, "--step-timeout", "2")
    try:
        time.sleep(5)
        results = cluster.generate_all(prompts[:2], PARAMS)
    finally:
        assert cluster.stop() == 0
    assert [r.token_ids for r in results] == [e.token_ids for e in expected[:2]]


def test_an_ffn_pod_runs_its_instance_s_processes_and_restarts_one_that_dies(
    checkpoint, prompts, expected
):
    """`afd ffn-pod`, what an FFN pod of G GPUs runs: every process of one FFN instance, by
    one command beside the controller and attention instances as the Helm chart starts them.
    Each attention instance sends its tokens to the instance once (to its door process); a
    process killed with SIGKILL is started again by the pod, and the cluster re-forms around
    it; a cluster shut down by the controller ends the pod cleanly."""
    controller = Child(afd(
        "controller", "--attention-instances", "2", "--ffn-instances", "1",
        "--gpus-per-ffn-instance", "2", "--model", str(checkpoint), "--micro-batches", "2",
        "--max-num-batched-tokens", str(BUDGET), stdout=subprocess.PIPE,
    ))  # fmt: skip
    children: list[Child] = []
    try:
        address = controller.wait_for(r"controller listening on (\S+)")[1]
        instance = ["--controller", address, "--model", str(checkpoint), "--dtype", "float32"]
        instance += ["--step-timeout", "3", "--metrics-port", "0"]
        attention = [
            Child(afd("attention", "--index", str(i), *instance, stdout=subprocess.PIPE))
            for i in range(2)
        ]
        pod = Child(afd("ffn-pod", "--index", "0", "--processes", "2", *instance,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT))  # fmt: skip
        children = [*attention, pod]
        serving = [child.wait_for(r"serving on (\S+)")[1] for child in attention]
        metrics = [child.wait_for(r"metrics on (\S+)")[1] for child in attention]
        pod.wait_for(r"\[ffn instance 0 process 1\] ffn instance 0 process 1 serving on")

        def served() -> list[list[int]]:
            where = [serving[i % 2] for i in range(len(prompts))]
            with ThreadPoolExecutor(len(prompts)) as pool:
                return [ids for ids, _ in pool.map(generate, where, prompts, range(len(prompts)))]

        assert served() == [e.token_ids for e in expected]
        # Each attention instance sent every token it computed once: to its door process.
        cfg = load_config(checkpoint)
        per_token = a2f_bytes_per_token(cfg, torch.float32, fp8=False)
        for where in metrics:
            tokens = attention_batch_tokens(where)["sum"]
            assert tokens > 0 and data_plane_bytes(where)[("a2f", "sent")] == tokens * per_token

        os.kill(pid_of("ffn --index 1", str(checkpoint)), signal.SIGKILL)
        pod.wait_for("ffn instance 0 process 1 exited with code -9; restarting it")
        reformed(address, epoch=2)  # new requests are refused (UNAVAILABLE) until then
        assert served() == [e.token_ids for e in expected]

        shut_down(address, children)
    finally:
        for child in children:
            child.stop()
        controller.stop()
