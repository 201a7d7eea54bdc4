"""The micro-batch pipeline overlaps attention and FFN for real, on CPU over gloo.

Two spawned processes, one attention rank and one FFN rank, form a real gloo group through a
TCPStore on 127.0.0.1 and run the production `ModelRunner` with `RemoteFFN`, and `FFNWorker`. Both
stages are slowed by the same sleep D per layer and micro-batch (test-only wrappers defined
here), so a step with no overlap takes layers * K * 2D. With K = 3 the pipeline keeps both
processes busy at once and the step takes about (layers * K + 1) * D, roughly half of that;
with K = 1 nothing can overlap and the step takes the full sum. The oracle for the tokens is
the single-process engine. Step headers travel on the data plane as in production; the
controller's part (waking the FFN side after an idle step) is played by the TCPStore.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.attention.builder import local_engine
from services.attention.engine import Engine, EngineConfig
from services.attention.kv_cache import KVCache
from services.attention.model_runner import ModelRunner
from services.attention.remote_ffn import PipelineConfig, RemoteFFN
from services.attention.scheduler import SchedulerConfig
from services.common.config import ModelConfig
from services.common.model.build import build_attention_half, build_ffn_half
from services.common.model.checkpoint_writer import random_tensor
from services.common.model.schema import checkpoint_tensors, is_ffn_tensor
from services.common.sampling_params import SamplingParams
from services.common.transport import Transport
from services.ffn.worker import FFNWorker
from tests.support.models import random_model, small_config

pytestmark = pytest.mark.timeout(45)

DELAY_S = 0.05  # per stage, layer and micro-batch: large against scheduling noise
REPEATS = 2  # measured steps per micro-batch count; the fastest counts
DTYPE = torch.float64  # so splitting the batch can never flip a greedy token
PROMPTS = [[(11 * i + 3 * j) % 500 for j in range(8)] for i in range(3)]  # one per micro-batch
GREEDY = SamplingParams(max_tokens=1, temperature=0.0)  # each request ends with its prefill
BUDGET = 32  # tokens per step: all three prompts fit one prefill step
ENGINE = EngineConfig(
    num_kv_blocks=16,
    enable_prefix_caching=False,  # every measured prefill computes all its tokens
    scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=BUDGET),
)
ATTENTION_RANK, FFN_RANK = 0, 1
PEERS = {ATTENTION_RANK: "attention instance 0", FFN_RANK: "ffn instance 0"}
TIMEOUT_S = 20.0  # gloo, store and transport waits: a dead peer fails the test, not hangs it
PROCESS_DEADLINE_S = 30.0  # spawn, import, form the group, 6 steps, stop
CPU = torch.device("cpu")
RESULT_KEY = "result"


class Slowed:
    """Wraps modules' `forward` (one layer, one micro-batch) with a sleep of `delay_s`."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.delay_s = 0.0
        for module in modules:
            module.forward = self._slowed(module.forward)

    def _slowed(self, forward):
        def slowed(*args):
            time.sleep(self.delay_s)
            return forward(*args)

        return slowed


def _tensors(cfg: ModelConfig, ffn_side: bool) -> dict[str, torch.Tensor]:
    return {
        name: random_tensor(name, shape, DTYPE, seed=0)
        for name, shape in checkpoint_tensors(cfg).items()
        if is_ffn_tensor(name) == ffn_side
    }


def _join(port: int, rank: int) -> tuple[dist.Store, Transport]:
    torch.set_num_threads(1)  # two processes on what may be two cores
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=TIMEOUT_S))
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore("group", store),
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    return store, Transport(PEERS, TIMEOUT_S)


def attention_process(port: int) -> None:
    store, transport = _join(port, ATTENTION_RANK)
    cfg = small_config()
    attention = build_attention_half(cfg, _tensors(cfg, ffn_side=False))
    slow = Slowed(*attention.layers)
    result = {}
    try:
        for k in (3, 1):
            cache = KVCache(cfg, ENGINE.num_kv_blocks, ENGINE.block_size, DTYPE, CPU)
            pipeline = PipelineConfig(num_micro_batches=k)
            bell = StoreBell(store, k)
            ffn = CountingFFN(cfg, DTYPE, CPU, transport, [FFN_RANK], 1, bell, pipeline, BUDGET)
            runner = ModelRunner(attention, ffn, cache, k)
            engine = Engine(runner, ENGINE.num_kv_blocks, ENGINE)
            times = []
            for repeat in range(REPEATS + 1):  # the first one, not slowed, warms up
                slow.delay_s = DELAY_S if repeat else 0.0
                store.set(f"delay/{k}/{ffn.step}", str(slow.delay_s))  # the FFN side's
                for i, prompt in enumerate(PROMPTS):
                    engine.add_request(f"k{k}-r{repeat}-p{i}", prompt, GREEDY)
                start = time.perf_counter()
                outputs = engine.step()  # the prefill: every prompt, one per micro-batch
                times.append(time.perf_counter() - start)
                assert all(out.finished for out in outputs)
                result[f"tokens-{k}"] = [list(out.new_token_ids) for out in outputs]
                result[f"counts-{k}"] = ffn.counts
            result[f"seconds-{k}"] = min(times[1:])
            store.set(f"delay/{k}/{ffn.step}", "0")
            runner.execute([])  # a step with no tokens: the cluster goes idle
            store.set(f"open/{k}/{ffn.step}", "stop")
    finally:
        store.set(RESULT_KEY, json.dumps(result))
        dist.destroy_process_group()


class CountingFFN(RemoteFFN):
    """The production executor, keeping the last step's tokens per micro-batch."""

    def begin(self, tokens_per_slot: list[int]) -> None:
        self.counts = tokens_per_slot
        super().begin(tokens_per_slot)


class StoreBell:
    """Stands in for the controller's step bell (step_bell.py, tested with a real controller
    in tests/dist/test_afd_cluster.py): opened steps are announced through the TCPStore."""

    def __init__(self, store: dist.Store, k: int) -> None:
        self.store, self.k = store, k

    def open(self, step: int) -> None:
        self.store.set(f"open/{self.k}/{step}", "go")

    def rang(self, step: int) -> bool:
        return False  # no peer attention instance to open steps

    def watch(self, step: int) -> None:
        pass


def ffn_process(port: int) -> None:
    store, transport = _join(port, FFN_RANK)
    cfg = small_config()
    shard = build_ffn_half(cfg, _tensors(cfg, ffn_side=True), dtype=DTYPE)
    slow = Slowed(shard)
    try:
        for k in (3, 1):
            worker = FFNWorker(cfg, shard, transport, [ATTENTION_RANK], k, BUDGET, DTYPE, CPU)
            step, idle = 0, True
            while not idle or store.get(f"open/{k}/{step}") != b"stop":
                slow.delay_s = float(store.get(f"delay/{k}/{step}"))
                idle = worker.run_step(step) == 0
                step += 1
    finally:
        dist.destroy_process_group()


def run_cluster() -> dict:
    """Runs both processes to the end; the attention process's measurements."""
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5)
    )
    context = mp.get_context("spawn")
    processes = [
        context.Process(target=target, args=(store.port,), name=target.__name__)
        for target in (attention_process, ffn_process)
    ]
    try:
        for process in processes:
            process.start()
        deadline = time.monotonic() + PROCESS_DEADLINE_S
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            assert process.exitcode == 0, f"{process.name} ended with {process.exitcode}"
        return json.loads(store.get(RESULT_KEY))
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(5)


def test_three_micro_batches_overlap_attention_and_ffn():
    result = run_cluster()
    layers = small_config().num_hidden_layers
    pipelined, serial = result["seconds-3"], result["seconds-1"]
    no_overlap_3 = layers * 3 * 2 * DELAY_S  # 1.5 s
    no_overlap_1 = layers * 1 * 2 * DELAY_S  # 0.5 s
    assert result["counts-3"] == [8, 8, 8] and result["counts-1"] == [24]
    assert pipelined < 0.8 * no_overlap_3, (
        f"3 micro-batches took {pipelined:.3f} s, {no_overlap_3:.3f} s with no overlap"
    )
    assert serial >= 0.9 * no_overlap_1, (
        f"1 micro-batch took {serial:.3f} s, under its {no_overlap_1:.3f} s of sleeps"
    )

    expected = local_engine(random_model(small_config(), DTYPE), ENGINE).generate(PROMPTS, GREEDY)
    assert result["tokens-3"] == result["tokens-1"] == [out.token_ids for out in expected]
