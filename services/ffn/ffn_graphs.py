"""An FFN instance's per-micro-batch compute replayed from CUDA graphs.

Between a micro-batch's receive and its send an FFN instance runs one layer of its FFN half:
a dozen to thirty kernels of a few microseconds each (gathers, grouped GEMMs, SiLU, the
weighted sum), which eager PyTorch issues one by one from Python for longer than the GPU
takes to run them. A graph per (layer, token bucket) issues them in one launch. Transfers
stay outside: the worker receives into its buffers, the inputs are copied into this module's
static ones, the graph replays, and the worker copies the output into its send buffer.

Padding rows (a micro-batch rounded up to its bucket) hold zeros, no routing weight and an
expert id past every shard's range, so they cost the experts nothing and change no real row.
Graphs serve the split layout only: the replicated layout's rows vary with the step.

What this module does not know: the data plane, or the plan of a step.
"""

from __future__ import annotations

import logging
from bisect import bisect_left

import torch
from torch import Tensor

from services.common.cuda_graph import capture
from services.common.model.attention_half import FFNInput
from services.common.model.ffn_half import FFNHalf, Fp8RoutedExperts, MoEFFN

log = logging.getLogger(__name__)

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536)
GRAPH_DTYPES = (torch.bfloat16,)  # what the grouped expert GEMMs take (no host sync)


def capturable(ffn: FFNHalf) -> bool:
    """Whether every layer runs without a host sync: on a GPU, experts grouped (bf16 or FP8)."""
    for layer in ffn.layers:
        if not isinstance(layer, MoEFFN) or isinstance(layer.moe, Fp8RoutedExperts):
            continue
        weight = layer.moe.gate_proj.weight
        if not weight.is_cuda or weight.dtype not in GRAPH_DTYPES:
            return False
    return next(ffn.parameters()).is_cuda


class FFNGraphs:
    def __init__(self, ffn: FFNHalf, max_tokens: int, dtype: torch.dtype) -> None:
        """`max_tokens`: the most tokens one micro-batch can bring (all attention members')."""
        cfg = ffn.cfg
        device = next(ffn.parameters()).device
        self.ffn = ffn
        self.buckets = [b for b in TOKEN_BUCKETS if b < max_tokens] + [max_tokens]
        n, k = max_tokens, cfg.moe_top_k
        self.h = torch.zeros(n, cfg.hidden_size, dtype=dtype, device=device)
        # Padding rows route to an expert no shard holds, with weight 0.
        self.no_expert = cfg.moe_num_experts
        self.ids = torch.full((n, k), self.no_expert, dtype=torch.long, device=device)
        self.weights = torch.zeros(n, k, dtype=torch.float32, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.enabled = True

    def run(self, layer: int, x: FFNInput) -> Tensor | None:
        """This shard's output [n, H] for layer `layer`, or None for an input these graphs do
        not serve (too many tokens; a capture that failed turns them off for good)."""
        n = x.h.shape[0]
        if not self.enabled or n > self.buckets[-1]:
            return None
        bucket = self.buckets[bisect_left(self.buckets, n)]
        self._fill(x, n, bucket)
        key = (layer, bucket)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(layer, bucket, x.ids is not None)
            except RuntimeError as err:
                log.warning("FFN layers run eagerly: capturing one failed (%s)", err)
                self.enabled = False
                return None
        graph, out = self.graphs[key]
        graph.replay()
        return out[:n]

    def _fill(self, x: FFNInput, n: int, bucket: int) -> None:
        self.h[:n].copy_(x.h)
        self.h[n:bucket].zero_()
        if x.ids is not None:
            self.ids[:n].copy_(x.ids)
            self.weights[:n].copy_(x.weights)
            self.ids[n:bucket].fill_(self.no_expert)
            self.weights[n:bucket].zero_()

    def _input(self, bucket: int, routed: bool) -> FFNInput:
        if not routed:
            return FFNInput(self.h[:bucket])
        return FFNInput(self.h[:bucket], self.ids[:bucket], self.weights[:bucket])

    def _capture(
        self, layer: int, bucket: int, routed: bool
    ) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        x = self._input(bucket, routed)
        # Other threads (the data plane's, NCCL's watchdog) use CUDA while this one captures.
        graph, out = capture(lambda: self.ffn(layer, x), self.pool, "thread_local")
        log.info("captured an FFN layer graph: layer %d, %d tokens", layer, bucket)
        return graph, out
