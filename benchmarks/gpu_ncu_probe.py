"""Kernel configurations for Nsight Compute to time one by one, without launch overhead or
graph effects: the split-K FP8 GEMM at the Table 9 layer's three shapes (M = 64) over block_n,
split and stages, and the MFA decode kernel (B = 128, 4K context, bf16 paged KV) over its tile,
warps and stages. Each launch is tagged by an NVTX range naming its configuration.

`ncu --clock-control none --nvtx --print-nvtx-rename kernel --metrics gpu__time_duration.sum
python benchmarks/gpu_ncu_probe.py` (clocks as the card runs them; ncu's own timing)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_attention_layer import PAGE, SCALE  # noqa: E402
from benchmarks.gpu_mfa_decode import paged_cache  # noqa: E402
from services.common.kernels import fp8_gemm  # noqa: E402
from services.common.kernels.fp8 import quantize_block_fp8  # noqa: E402
from services.common.kernels.mfa_decode import KernelConfig, mfa_decode  # noqa: E402
from services.common.kernels.quantize import quantize_activation  # noqa: E402

GEMMS = {"qkv": (2560, 7168), "wq": (16384, 2048), "o_proj": (7168, 16384)}
GEMM_CONFIGS = [  # (block_n, split, stages)
    (64, None, 4), (64, None, 3), (64, None, 5), (128, None, 3), (128, None, 4),
    (128, "x2", 3), (128, "x2", 4), (64, "x1.5", 4), (128, "x1.5", 3),
]  # fmt: skip
ATTENTION_CONFIGS = [  # (block_n, warps, stages, splits)
    (32, 4, 3, 2),
    (32, 8, 3, 2),
    (16, 8, 5, 2),
    (32, 8, 2, 2),
    (64, 8, 2, 2),
    (16, 4, 5, 2),
]


def main() -> None:
    for name, (n, k) in GEMMS.items():
        weight, scale = quantize_block_fp8(torch.randn(n, k, device="cuda") * k**-0.5)
        xq, xs = quantize_activation(torch.randn(64, k, device="cuda").bfloat16(), 128)
        for block_n, split, stages in GEMM_CONFIGS:
            base = max(1, min(fp8_gemm.MAX_SPLIT_K, 2 * 132 // -(-n // block_n), k // 128))
            s = {None: base, "x2": 2 * base, "x1.5": max(base + 1, base * 3 // 2)}[split]
            tag = f"{name}/bn{block_n}/split{s}/st{stages}"
            torch.cuda.nvtx.range_push(tag)
            fp8_gemm.gemm_partials(xq, xs, weight, scale, s, block_n=block_n, num_stages=stages)
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()
    q, k_cache, v_cache, tables, lens = paged_cache(128, 4096, PAGE)
    for block_n, warps, stages, splits in ATTENTION_CONFIGS:
        config = KernelConfig(block_n, warps, stages, programs_per_sm=2)
        torch.cuda.nvtx.range_push(f"mfa/bn{block_n}/w{warps}/st{stages}/sp{splits}")
        try:
            mfa_decode(q, k_cache, v_cache, tables, lens, SCALE, block_size=PAGE, config=config,
                       num_splits=splits)  # fmt: skip
        except Exception as e:  # noqa: BLE001  (a config that does not fit says why)
            print(f"mfa {block_n} {warps} {stages}: {type(e).__name__}")
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()


if __name__ == "__main__":
    main()
