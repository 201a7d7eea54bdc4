"""An FFN instance's share of the weights (services/ffn/loader.py): read layer by layer it is
the same as sliced from the whole checkpoint; re-sharding to another FFN count frees the old
share before reading the new one; the count to load for is guessed from the controller."""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace
from pathlib import Path

import torch

from services.common.cluster import ClusterState, Member, Membership
from services.common.cluster_config import SPLIT, ClusterConfig
from services.common.model.attention_half import FFNInput
from services.common.model.build import build_ffn_half
from services.common.model.checkpoint_writer import write_random_weights
from services.common.model.ffn_half import FFNHalf, ShardSpec
from services.common.model.schema import checkpoint_tensors, is_ffn_tensor
from services.common.model.weights import load_weights
from services.common.presets import tiny_config
from services.ffn.loader import ShardLoader, expected_ffn_count
from services.ffn.worker import FFNWorker

CFG = replace(tiny_config(), vocab_size=1000, eos_token_ids=(999,))
CPU = torch.device("cpu")


def checkpoint(tmp_path: Path) -> Path:
    write_random_weights(tmp_path, CFG, dtype=torch.float32, progress=False)
    return tmp_path


def membership(num_ffn: int) -> Membership:
    members = (Member("attention", 0, 0, "a:1"),) + tuple(
        Member("ffn", i, 1 + i, f"f{i}:1") for i in range(num_ffn)
    )
    return Membership(1, len(members), "h", 1, ClusterConfig(num_micro_batches=1), members)


def test_a_share_read_layer_by_layer_equals_the_slice_of_the_whole_checkpoint(tmp_path):
    path = checkpoint(tmp_path)
    by_layer = ShardLoader(str(path), CFG, torch.float32, CPU, 1, SPLIT).load(2)
    names = [n for n in checkpoint_tensors(CFG) if is_ffn_tensor(n)]
    whole = load_weights(path, CFG, dtype=torch.float32, names=names, progress=False)
    sliced = build_ffn_half(CFG, whole, ShardSpec(1, 2), dtype=torch.float32)
    moe = CFG.moe_layers[0]
    h = torch.randn(5, CFG.hidden_size)  # T = 5 tokens
    ids = torch.randint(0, CFG.moe_num_experts, (5, CFG.moe_top_k))
    weights = torch.rand(5, CFG.moe_top_k)
    for layer in (0, moe):  # a dense layer and a MoE layer
        torch.testing.assert_close(
            by_layer(layer, FFNInput(h, ids, weights)),
            sliced(layer, FFNInput(h, ids, weights)),
            rtol=0,
            atol=0,
        )
    assert by_layer.expert_range == range(CFG.moe_num_experts // 2, CFG.moe_num_experts)


def test_resharding_frees_the_old_share_before_reading_the_new_one(tmp_path):
    path = checkpoint(tmp_path)
    reads: list[bool] = []  # per read: whether the old share was gone by then

    class Watched(ShardLoader):
        def load(self, num_ffn: int) -> FFNHalf:
            gc.collect()
            reads.append(old() is None)
            return super().load(num_ffn)

    loader = Watched(str(path), CFG, torch.float32, CPU, 0, SPLIT)
    first = ShardLoader.load(loader, 1)  # read unwatched: there is no old share yet
    worker = FFNWorker(CFG, first, None, [0], 1, 8, torch.float32, CPU)
    del first
    old = weakref.ref(worker.shard)
    loader.refit(worker, membership(1))
    assert reads == [], "the same count: nothing is read again"
    loader.refit(worker, membership(2))
    assert reads == [True], "two shares must never be in memory at once"
    assert worker.shard.spec.num_shards == 2
    assert worker.shard.expert_range == range(0, CFG.moe_num_experts // 2)


def test_the_count_to_load_for_comes_from_the_controller():
    def state(formed: Membership | None, size: int) -> ClusterState:
        return ClusterState(1, formed, 1, size, ClusterConfig())

    assert expected_ffn_count(state(None, 3), 0) == 3, "before the first epoch: the size"
    assert expected_ffn_count(state(membership(2), 2), 1) == 2, "a replacement"
    assert expected_ffn_count(state(membership(2), 3), 2) == 3, "a new place (scaled up)"
    assert expected_ffn_count(state(membership(3), 2), 0) == 2, "never above the size"

    def grouped(formed: Membership | None, size: int) -> ClusterState:
        return ClusterState(1, formed, 1, size, ClusterConfig(ffn_instance_size=2))

    # A new FFN instance of 2 processes: either of them loads for the places through both.
    assert expected_ffn_count(grouped(membership(2), 4), 2) == 4
    assert expected_ffn_count(grouped(membership(2), 4), 3) == 4
