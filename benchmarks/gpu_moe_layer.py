"""One MoE layer at Step-3's real shapes on one GPU, against its roofline.

48 routed experts (intermediate 5120) with top-3 routing plus the shared expert (5120), hidden
7168, bf16 weights, for T tokens (2048 by default, the FFN side's batch in the paper's
deployment). Times, each the median of CUDA-graph replays where the code can be captured:
- `grouped`: `expert_forward_on`'s GPU choice (three grouped GEMMs over all experts, no host sync)
  plus the shared expert;
- `fp8`: the routed experts in FP8 (`fp8_grouped_expert_forward`: e4m3 weights with one scale
  per row, per-token e4m3 activations, scaled grouped GEMMs) plus the same bf16 shared expert;
- `looped`: the exact one-expert-at-a-time loop (host syncs, so timed eagerly), plus the same
  shared expert;
each against its roofline max(weight bytes / copy bandwidth, FLOPs / matmul peak), the
ceilings (copy, bf16 and e4m3 matmul) measured in the same run. Routing is uniform random
(balanced in expectation).

A script, not a test: `python benchmarks/gpu_moe_layer.py [--tokens 2048 512 128]`.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_timing import (  # noqa: E402
    copy_bandwidth,
    fp8_matmul_peak,
    graph_us,
    matmul_peak,
    median_us,
)
from services.common.kernels.experts import TRITON  # noqa: E402
from services.common.model.fp8_moe import Fp8Experts, fp8_grouped_expert_forward  # noqa: E402
from services.common.model.moe import (  # noqa: E402
    grouped_expert_forward,
    looped_expert_forward,
    route,
)

HIDDEN, EXPERTS, INTER, TOP_K, SHARED = 7168, 48, 5120, 3, 5120


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 512, 128])
    args = parser.parse_args()
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    scale = HIDDEN**-0.5
    gate = torch.randn(EXPERTS, INTER, HIDDEN, device=dev, dtype=bf16) * scale
    up = torch.randn(EXPERTS, INTER, HIDDEN, device=dev, dtype=bf16) * scale
    down = torch.randn(EXPERTS, HIDDEN, INTER, device=dev, dtype=bf16) * INTER**-0.5
    s_gate = torch.randn(SHARED, HIDDEN, device=dev, dtype=bf16) * scale
    s_up = torch.randn(SHARED, HIDDEN, device=dev, dtype=bf16) * scale
    s_down = torch.randn(HIDDEN, SHARED, device=dev, dtype=bf16) * SHARED**-0.5
    copy, peak, fp8_peak = copy_bandwidth(), matmul_peak(), fp8_matmul_peak()
    fp8_experts = Fp8Experts.quantize(gate, up, down)
    weight_bytes = sum(t.numel() * t.element_size() for t in (gate, up, down, s_gate, s_up, s_down))

    def shared(x):
        return F.linear(F.silu(F.linear(x, s_gate)) * F.linear(x, s_up), s_down)

    print(f"{datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}; "
          f"copy {copy / 1e9:.0f} GB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s, e4m3 matmul "
          f"{fp8_peak / 1e12:.0f} TFLOP/s; bf16 weights {weight_bytes / 1e9:.2f} GB\n")  # fmt: skip
    print("| tokens | grouped us | roofline us | grouped / roofline | fp8 us | fp8 roofline us "
          "| fp8 / fp8 roofline | looped us | looped / grouped | fp8 rel. err |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        x = torch.randn(tokens, HIDDEN, device=dev, dtype=bf16)
        weights, ids = route(torch.randn(tokens, EXPERTS, device=dev), TOP_K, renormalize=False)
        grouped = graph_us(
            lambda x=x, w=weights, i=ids: (
                grouped_expert_forward(x, w, i, gate, up, down, ops=TRITON) + shared(x)
            )
        )
        fp8 = graph_us(
            lambda x=x, w=weights, i=ids: (
                fp8_grouped_expert_forward(x, w, i, fp8_experts, ops=TRITON) + shared(x)
            )
        )
        looped = median_us(
            lambda x=x, w=weights, i=ids: looped_expert_forward(x, w, i, gate, up, down) + shared(x)
        )
        exact = grouped_expert_forward(x, weights, ids, gate, up, down, ops=TRITON).float()
        approx = fp8_grouped_expert_forward(x, weights, ids, fp8_experts, ops=TRITON).float()
        error = ((approx - exact).norm() / exact.norm()).item()
        touched = ids.unique().numel() / EXPERTS  # experts with no token read no weights
        routed_params = 3 * EXPERTS * INTER * HIDDEN * touched
        shared_bytes = 3 * SHARED * HIDDEN * 2
        flops = 2 * tokens * 3 * HIDDEN * (TOP_K * INTER + SHARED)
        roofline = max((2 * routed_params + shared_bytes) / copy, flops / peak) * 1e6
        fp8_roofline = max((routed_params + shared_bytes) / copy, flops / fp8_peak) * 1e6
        cells = [f"{grouped:.0f}", f"{roofline:.0f}", f"{grouped / roofline:.2f}"]
        cells += [f"{fp8:.0f}", f"{fp8_roofline:.0f}", f"{fp8 / fp8_roofline:.2f}"]
        cells += [f"{looped:.0f}", f"{looped / grouped:.1f}", f"{error:.3f}"]
        print(f"| {tokens} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
