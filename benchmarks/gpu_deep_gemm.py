"""DeepGEMM's block-FP8 GEMMs side by side with the project's own, at Step-3's decode shapes.

Two families, each checked against a float32 product of the dequantised operands before it is
timed (relative error printed beside the time):

- routed experts of one FFN instance (3 of 48 experts, the paper's 16 FFN GPUs; --experts to
  change): the project's path, `torch._scaled_grouped_mm` with one scale per weight row and
  per token (gate, up, down: three GEMMs), against DeepGEMM's masked grouped GEMM
  (`m_grouped_fp8_gemm_nt_masked`) on the checkpoint's own 128 x 128 block scales with
  1 x 128 activation scales, gate and up fused into one GEMM;
- dense linears (attention projections at decode's b tokens, a dense MLP's 1/16 slice at the
  FFN's 16 b tokens): `Fp8Linear.matmul` (cuBLASLt blockwise, or the Triton split-K GEMM where
  its rule picks it) against DeepGEMM's `fp8_gemm_nt`.

Times are medians of CUDA-graph replays with the L2 flushed (`gpu_timing.graph_us`); GB/s
counts the weight bytes a GEMM must stream, held against the copy bandwidth measured in the
same run. DeepGEMM is optional: install `sgl-deep-gemm` (it compiles its kernels with the
machine's nvcc at first use).

A script, not a test: `python benchmarks/gpu_deep_gemm.py` prints Markdown tables.
"""

# ruff: noqa: B023 (each closure is timed in the iteration that made it)
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_timing import copy_bandwidth, graph_us  # noqa: E402
from services.common.kernels.fp8 import (  # noqa: E402
    FP8_DTYPE,
    dequantize_block_fp8,
    quantize_activation_reference,
    quantize_block_fp8,
    quantize_fp8,
    quantize_rows_fp8,
)
from services.common.kernels.fp8_gemm import masked_grouped_gemm  # noqa: E402
from services.common.kernels.grouped_gemm import deep_gemm, masked_gemm  # noqa: E402
from services.common.model.fp8_linear import Fp8Linear, pick_scaling  # noqa: E402

H, F_MOE, EXPERTS, TOP_K = 7168, 5120, 48, 3
DENSE = [  # (name, N, K, tokens)
    ("qkv 7168->2560, b=128", 2560, 7168, 128),
    ("wq 2048->16384, b=128", 16384, 2048, 128),
    ("o_proj 16384->7168, b=128", 7168, 16384, 128),
    ("qkv, b=64", 2560, 7168, 64),
    ("o_proj, b=64", 7168, 16384, 64),
    ("dense gate|up 1/16 7168->2304, 2048 tok", 2304, 7168, 2048),
    ("dense down 1/16 1152->7168, 2048 tok", 7168, 1152, 2048),
    ("shared gate|up 1/8 7168->1280, 2048 tok", 1280, 7168, 2048),
    ("shared down 1/8 640->7168, 2048 tok", 7168, 640, 2048),
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def mn_major(scale: torch.Tensor) -> torch.Tensor:
    """Activation scales [E, M, K/128] (or [M, K/128]) as DeepGEMM's SM90 kernels read them
    (M-major), the layout the expert path writes them in."""
    flat = scale.dim() == 2
    scale = scale[None] if flat else scale
    experts, m, groups = scale.shape
    out = torch.empty(experts, groups, m, device=scale.device).transpose(1, 2)
    out.copy_(scale)
    return out[0] if flat else out


def act_block(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3, scales [..., K/128]) with 1 x 128 groups."""
    flat = x.reshape(-1, x.shape[-1])
    q, s = quantize_activation_reference(flat, 128)
    return q.view(x.shape), s.contiguous().view(*x.shape[:-1], -1)


def dense_rows(bw: float) -> None:
    print("\n| GEMM | ours us (GB/s, err) | DeepGEMM us (GB/s, err) | ours / DeepGEMM |")
    print("|---|---|---|---|")
    for name, n, k, m in DENSE:
        w = torch.randn(n, k, device="cuda") * k**-0.5
        wq, ws = quantize_block_fp8(w)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ dequantize_block_fp8(wq, ws, (128, 128), torch.float32).T
        try:
            ours = Fp8Linear(wq, ws.contiguous(), pick_scaling("cuda"))
            xq, xs = ours.quantize_input(x)
            out = ours.matmul(xq, xs)[:m]
            t_ours = graph_us(lambda: ours.matmul(xq, xs))
            e_ours = rel_err(out, ref)
            ours_cell = f"{t_ours:.1f} ({wq.numel() / t_ours / 1e3:.0f}, {e_ours:.1e})"
        except Exception as e:  # noqa: BLE001 - a probe: report and go on
            t_ours, ours_cell = float("nan"), f"failed: {type(e).__name__}: {e}"[:80]
        aq, a_s = act_block(x)
        a_s = mn_major(a_s)
        d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        if deep_gemm is None:
            print(f"| {name} | {ours_cell} | not loaded | |", flush=True)
            continue
        try:
            start = time.perf_counter()
            deep_gemm.fp8_gemm_nt((aq, a_s), (wq, ws), d)
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            e_dg = rel_err(d, ref)
            t_dg = graph_us(lambda: deep_gemm.fp8_gemm_nt((aq, a_s), (wq, ws), d))
            dg_cell = f"{t_dg:.1f} ({wq.numel() / t_dg / 1e3:.0f}, {e_dg:.1e}; first {first:.1f}s)"
        except Exception as e:  # noqa: BLE001
            t_dg, dg_cell = float("nan"), f"failed: {type(e).__name__}: {e}"[:120]
        print(f"| {name} | {ours_cell} | {dg_cell} | {t_ours / t_dg:.2f} |", flush=True)
    print(f"(copy bandwidth {bw / 1e9:.0f} GB/s)")


def expert_rows(bw: float, local: int, token_counts: list[int]) -> None:
    wg = torch.randn(local, F_MOE, H, device="cuda") * H**-0.5
    wu = torch.randn(local, F_MOE, H, device="cuda") * H**-0.5
    wd = torch.randn(local, H, F_MOE, device="cuda") * F_MOE**-0.5
    # The project's path: one scale per output row.
    (gq, gs), (uq, us), (dq, ds) = (quantize_rows_fp8(w) for w in (wg, wu, wd))
    # DeepGEMM's: the checkpoint's 128 x 128 blocks, gate and up stacked per expert.
    guq, gus = quantize_block_fp8(torch.cat([wg, wu], dim=1))
    dbq, dbs = quantize_block_fp8(wd)
    ref_gu = dequantize_block_fp8(guq, gus, (128, 128), torch.float32)
    ref_d = dequantize_block_fp8(dbq, dbs, (128, 128), torch.float32)
    weight_bytes = 3 * local * F_MOE * H
    print(f"\n{local} local experts, {weight_bytes / 1e6:.0f} MB of e4m3 weights; floor "
          f"{weight_bytes / bw * 2e6:.0f} us at copy bandwidth")  # fmt: skip
    print(
        "| tokens | local rows | ours 3 GEMMs us | DeepGEMM gate|up us | DeepGEMM down us | "
        "DeepGEMM total us (GB/s) | ours / DeepGEMM | err ours / DG gate|up / DG down |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for tokens in token_counts:
        ids = torch.rand(tokens, EXPERTS, device="cuda").topk(TOP_K, dim=1).indices
        counts = torch.stack([(ids == e).sum() for e in range(local)]).int()
        rows = int(counts.sum())
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        x = torch.randn(rows, H, device="cuda", dtype=torch.bfloat16)
        # ours
        xq, xs = quantize_fp8(x)

        def ours():
            g = torch._scaled_grouped_mm(xq, gq.transpose(-2, -1), xs, gs, offs=offsets,
                                         out_dtype=torch.bfloat16)  # fmt: skip
            u = torch._scaled_grouped_mm(xq, uq.transpose(-2, -1), xs, us, offs=offsets,
                                         out_dtype=torch.bfloat16)  # fmt: skip
            a = g[:, :F_MOE] * u  # stands in for the fused activation: same bytes order
            aq, as_ = quantize_fp8(a)
            return torch._scaled_grouped_mm(aq, dq.transpose(-2, -1), as_, ds, offs=offsets,
                                            out_dtype=torch.bfloat16)  # fmt: skip

        t_ours_total = graph_us(ours)
        gemm_only_in = quantize_fp8(x)

        def ours_gemms():
            for w, s in ((gq, gs), (uq, us)):
                torch._scaled_grouped_mm(gemm_only_in[0], w.transpose(-2, -1), gemm_only_in[1],
                                         s, offs=offsets, out_dtype=torch.bfloat16)  # fmt: skip
            a = torch.empty(rows, F_MOE, device="cuda", dtype=FP8_DTYPE)
            torch._scaled_grouped_mm(a, dq.transpose(-2, -1), xs, ds, offs=offsets,
                                     out_dtype=torch.bfloat16)  # fmt: skip

        t_ours = graph_us(ours_gemms)
        g0 = x[: counts[0]].float() @ (gq[0].float() * gs[0][:, None]).T
        out_g = torch._scaled_grouped_mm(xq, gq.transpose(-2, -1), xs, gs, offs=offsets,
                                         out_dtype=torch.bfloat16)  # fmt: skip
        e_ours = rel_err(out_g[: counts[0]], g0)
        # DeepGEMM masked: [local, M_max, K]
        m_max = max(int(counts.max()), 1)
        m_max = (m_max + 63) // 64 * 64
        a = torch.zeros(local, m_max, H, device="cuda", dtype=torch.bfloat16)
        starts = [0, *offsets.tolist()[:-1]]
        for e in range(local):
            a[e, : counts[e]] = x[starts[e] : starts[e] + counts[e]]
        aq, a_s = act_block(a)
        a_s = mn_major(a_s)
        d_gu = torch.empty(local, m_max, 2 * F_MOE, device="cuda", dtype=torch.bfloat16)
        expected = max(rows // local, 1)
        act = torch.randn(local, m_max, F_MOE, device="cuda", dtype=torch.bfloat16)
        pq, p_s = act_block(act)
        p_s = mn_major(p_s)
        d_d = torch.empty(local, m_max, H, device="cuda", dtype=torch.bfloat16)
        impls = {"triton": masked_grouped_gemm}
        if deep_gemm is not None:
            impls["deep_gemm"] = masked_gemm
        for name, gemm in impls.items():
            try:
                start = time.perf_counter()
                gemm(aq, a_s, guq, gus, counts, expected, d_gu)
                torch.cuda.synchronize()
                first = time.perf_counter() - start
                ref = a[0, : counts[0]].float() @ ref_gu[0].T
                e_gu = rel_err(d_gu[0, : counts[0]], ref)
                t_gu = graph_us(lambda: gemm(aq, a_s, guq, gus, counts, expected, d_gu))
                gemm(pq, p_s, dbq, dbs, counts, expected, d_d)
                ref = act[0, : counts[0]].float() @ ref_d[0].T
                e_d = rel_err(d_d[0, : counts[0]], ref)
                t_d = graph_us(lambda: gemm(pq, p_s, dbq, dbs, counts, expected, d_d))
                total = t_gu + t_d
                cells = (f"{name}: {t_gu:.1f} (first call {first:.1f}s) | {t_d:.1f} | "
                         f"{total:.1f} ({weight_bytes / total / 1e3:.0f}) | "
                         f"{t_ours / total:.2f}")  # fmt: skip
                errs = f"{e_ours:.1e} / {e_gu:.1e} / {e_d:.1e}"
            except Exception as e:  # noqa: BLE001
                cells, errs = f"{name} failed: {type(e).__name__}: {e}"[:200] + " | | | |", ""
            print(f"| {tokens} | {rows} | {t_ours:.1f} (with act {t_ours_total:.1f}) | {cells} | "
                  f"{errs} |", flush=True)  # fmt: skip


def ffn_stage_rows(tokens: int, num_ffn: int) -> None:
    """The FFN stage as the projection times it (FFN instance 0 of `num_ffn`, its MoE layer
    and its dense layer, from CUDA graphs), with the routed experts requantised per row (the
    older path) and on their block scales (the masked grouped GEMM: DeepGEMM's where it
    loads, else the Triton one), built from the same random weights' seed."""
    from benchmarks.gpu_decode_projection import FFNStage

    print(f"\n| FFN stage, {tokens} tokens, instance 0 of {num_ffn} | dense us | MoE us |")
    print("|---|---|---|")
    for experts in ("rows", "block"):
        torch.manual_seed(0)
        stage = FFNStage(experts)
        dense, moe = stage.time_us(tokens, num_ffn)
        print(f"| experts: {experts} | {dense:.0f} | {moe:.0f} |", flush=True)
        del stage
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=3, help="local experts (48 / FFN GPUs)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 2048, 4096])
    parser.add_argument("--only", choices=("experts", "dense", "stage"), nargs="+",
                        default=["stage", "experts", "dense"])  # fmt: skip
    args = parser.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    version = getattr(deep_gemm, "__version__", "not loaded")
    print(f"{props.name}, torch {torch.__version__}, deep_gemm {version}", flush=True)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    if "stage" in args.only:
        ffn_stage_rows(2048, EXPERTS // args.experts)
    if "experts" in args.only:
        expert_rows(bw, args.experts, args.tokens)
    if "dense" in args.only:
        dense_rows(bw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
