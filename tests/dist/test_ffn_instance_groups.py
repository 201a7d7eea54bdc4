"""FFN instances of several processes give the single-process engine's tokens, on CPU (gloo).

Spawned processes form one real gloo group: M attention ranks running the production
`Engine` + `ModelRunner` + `RemoteFFN`, and N FFN instances of G processes each running
`FFNWorker` with an `InstanceGroup` over the instance's own process groups. Each attention
instance sends only to its door process of each FFN instance (a % G); the instance gathers,
computes its G shards, adds them up inside and answers with one partial. The oracle is the
single-process engine over the same weights (float64, so no split can flip a token).
The controller's part (opening a step after an idle one) is played by the TCPStore, as in
test_pipeline_overlap.py; membership and `afd serve` do not know such instances yet.
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
from services.common.model.build import build_attention_half, build_ffn_half
from services.common.model.checkpoint_writer import random_tensor
from services.common.model.ffn_half import ShardSpec
from services.common.model.schema import checkpoint_tensors, is_ffn_tensor
from services.common.sampling_params import SamplingParams
from services.common.transport import Transport
from services.common.ffn_instances import InstanceGroups
from services.ffn.instance_group import InstanceGroup
from services.ffn.worker import FFNWorker
from tests.support.models import a2f_bytes_per_token, random_model, small_config

pytestmark = pytest.mark.timeout(90)

DTYPE = torch.float64
CFG = small_config()
PROMPTS = [[(13 * i + 5 * j) % 500 for j in range(3 + 4 * i)] for i in range(4)]
PARAMS = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
BUDGET = 32
ENGINE = EngineConfig(
    num_kv_blocks=32, scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=BUDGET)
)
TIMEOUT_S = 30.0
CPU = torch.device("cpu")


def _tensors(ffn_side: bool) -> dict[str, torch.Tensor]:
    return {
        name: random_tensor(name, shape, DTYPE, seed=0)
        for name, shape in checkpoint_tensors(CFG).items()
        if is_ffn_tensor(name) == ffn_side
    }


def _join(port: int, rank: int, m: int, n: int, g: int):
    """The world group, every FFN instance's two groups (made by every rank, in order), and
    the transport."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=TIMEOUT_S))
    dist.init_process_group(
        "gloo", store=dist.PrefixStore("group", store), rank=rank, world_size=m + n * g,
        timeout=timedelta(seconds=TIMEOUT_S),
    )  # fmt: skip
    groups = []
    for f in range(n):
        ranks = [m + f * g + p for p in range(g)]
        groups.append((dist.new_group(ranks), dist.new_group(ranks, backend="gloo")))
    names = {a: f"attention instance {a}" for a in range(m)}
    names |= {m + f * g + p: f"ffn instance {f} process {p}" for f in range(n) for p in range(g)}
    return store, groups, Transport(names, TIMEOUT_S)


class StoreBell:
    """Stands in for the controller's step bell: opened steps are keys of the TCPStore."""

    def __init__(self, store: dist.Store) -> None:
        self.store = store

    def open(self, step: int) -> None:
        self.store.set(f"open/{step}", "go")

    def rang(self, step: int) -> bool:
        return self.store.check([f"open/{step}"])

    def watch(self, step: int) -> None:
        pass


def attention_process(port: int, a: int, m: int, n: int, g: int, k: int) -> None:
    store, _, transport = _join(port, a, m, n, g)
    doors = [m + f * g + a % g for f in range(n)]
    try:
        attention = build_attention_half(CFG, _tensors(ffn_side=False))
        cache = KVCache(CFG, ENGINE.num_kv_blocks, ENGINE.block_size, DTYPE, CPU)
        ffn = CountingFFN(
            CFG, DTYPE, CPU, transport, doors, m, StoreBell(store), PipelineConfig(k), BUDGET
        )
        engine = Engine(ModelRunner(attention, ffn, cache, k), ENGINE.num_kv_blocks, ENGINE)
        mine = list(range(a, len(PROMPTS), m))
        for i in mine:
            engine.add_request(f"p{i}", PROMPTS[i], PARAMS)
        tokens = {}
        while engine.has_unfinished_requests() or ffn.must_step():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        store.set(f"tokens/{a}", json.dumps(tokens))
        sent = transport.traffic.bytes[("a2f", "sent")]
        store.set(f"bytes/{a}", json.dumps([sent, ffn.computed]))
        store.set(f"done/{a}", str(ffn.step))
        if a == 0:  # every attention instance is idle at the same step: the FFN side stops
            store.wait([f"done/{b}" for b in range(m)])
            store.set(f"open/{ffn.step}", "stop")
    finally:
        dist.destroy_process_group()


class CountingFFN(RemoteFFN):
    """The production executor, counting the tokens it sends (every step's)."""

    computed = 0

    def begin(self, tokens_per_slot: list[int]) -> None:
        self.computed += sum(tokens_per_slot)
        super().begin(tokens_per_slot)


def ffn_process(port: int, f: int, p: int, m: int, n: int, g: int, k: int) -> None:
    store, groups, transport = _join(port, m + f * g + p, m, n, g)
    try:
        data, headers = groups[f]
        spec = ShardSpec(f * g + p, n * g)
        shard = build_ffn_half(CFG, _tensors(ffn_side=True), spec, dtype=DTYPE)
        worker = FFNWorker(
            CFG, shard, transport, list(range(m)), k, BUDGET, DTYPE, CPU,
            summarises=f == 0, instance=InstanceGroup(InstanceGroups(data, headers, p, g)),
        )  # fmt: skip
        step, idle = 0, True
        while not idle or store.get(f"open/{step}") != b"stop":
            idle = worker.run_step(step) == 0
            step += 1
    finally:
        dist.destroy_process_group()


def run_cluster(m: int, n: int, g: int, k: int) -> tuple[dict[str, list[int]], list]:
    """Every request's tokens; per attention instance, (A2F bytes sent, tokens computed)."""
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5)
    )
    context = mp.get_context("spawn")
    processes = [
        context.Process(target=attention_process, args=(store.port, a, m, n, g, k))
        for a in range(m)
    ] + [
        context.Process(target=ffn_process, args=(store.port, f, p, m, n, g, k))
        for f in range(n)
        for p in range(g)
    ]
    try:
        for process in processes:
            process.start()
        deadline = time.monotonic() + 75.0
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        assert [process.exitcode for process in processes] == [0] * len(processes)
        tokens: dict[str, list[int]] = {}
        for a in range(m):
            tokens |= json.loads(store.get(f"tokens/{a}"))
        return tokens, [json.loads(store.get(f"bytes/{a}")) for a in range(m)]
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(5)


@pytest.mark.parametrize(
    ("m", "n", "g", "k"), [(2, 1, 2, 2), (1, 2, 2, 3), (2, 2, 2, 4), (1, 1, 3, 1)]
)
def test_ffn_instances_of_several_processes_give_the_reference_tokens(m, n, g, k):
    expected = local_engine(random_model(CFG, DTYPE), ENGINE).generate(PROMPTS, PARAMS)
    tokens, traffic = run_cluster(m, n, g, k)
    assert [tokens[f"p{i}"] for i in range(len(PROMPTS))] == [e.token_ids for e in expected]
    # Each attention instance sent every token of every layer once per FFN instance, not
    # once per FFN process: the traffic a G-process instance exists to cut.
    per_token = a2f_bytes_per_token(CFG, DTYPE, fp8=False)
    for sent, computed in traffic:
        assert computed > 0 and sent == computed * n * per_token
