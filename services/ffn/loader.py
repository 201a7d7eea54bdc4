"""Which share of the feed-forward weights an FFN instance holds, and reading it.

The share depends on how many FFN instances the epoch has (experts are split by index), and
an instance loads it *before* it joins: a cluster re-forms around a member only once that
member can serve, so the others do not wait in a rendezvous while it reads a real
checkpoint for minutes. The count is read from the controller beforehand and checked once
the epoch has formed; when it differs (the FFN side was scaled meanwhile, or since) the
share is read again before the instance says it is ready.

Reads layer by layer: one layer's whole tensors are in memory at a time, not the model's
experts (which do not fit on one device).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from services.common.cluster import ClusterState, Membership
from services.common.cluster_config import SPLIT
from services.common.config import ModelConfig
from services.common.model.build import build_ffn_half, fp8_experts_for, fp8_weights_on
from services.common.model.ffn_half import FFNHalf, ShardSpec
from services.common.model.schema import is_ffn_tensor
from services.common.model.weights import Checkpoint
from services.ffn.worker import FFNWorker

log = logging.getLogger(__name__)


def expected_ffn_count(state: ClusterState, index: int) -> int:
    """How many FFN places (processes) the epoch this one joins will likely have: the
    cluster's size before the first epoch; later, the current count, or up to this place's
    whole instance for a new one (scaled up), never more than the size."""
    formed = state.membership
    if formed is None:
        return state.num_ffn_places
    g = state.config.ffn_instance_size
    through_mine = (index // g + 1) * g
    return min(state.num_ffn_places, max(len(formed.ffn_ranks), through_mine))


@dataclass(frozen=True)
class ShardLoader:
    model_dir: str
    cfg: ModelConfig
    dtype: torch.dtype
    device: torch.device
    index: int
    layout: str

    def load(self, num_ffn: int) -> FFNHalf:
        """This instance's share when there are `num_ffn` FFN instances."""
        spec = ShardSpec(self.index, num_ffn, split_mlp=self.layout == SPLIT)
        checkpoint = Checkpoint(self.model_dir, self.cfg)  # headers read and checked once
        names = [n for n in checkpoint.schema if is_ffn_tensor(n)]

        def layer(i: int) -> dict[str, torch.Tensor]:
            prefix = f"model.layers.{i}."
            return checkpoint.load(
                dtype=self.dtype, device=self.device, progress=False,
                names=[name for name in names if name.startswith(prefix)],
                keep_fp8=fp8_weights_on(self.device),
            )  # fmt: skip

        fp8_experts = fp8_experts_for(checkpoint, self.device)
        return build_ffn_half(self.cfg, layer, spec, fp8_experts, self.dtype)

    def refit(self, worker: FFNWorker, membership: Membership) -> None:
        """Give `worker` the share for the epoch's FFN count, if it holds another: the old
        share is dropped before the new one is read (two do not fit on the device)."""
        num_ffn = len(membership.ffn_ranks)
        if worker.shard is not None and worker.shard.spec.num_shards == num_ffn:
            return
        log.info("re-sharding for %d FFN instances", num_ffn)
        worker.reshard(None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        worker.reshard(self.load(num_ffn))
