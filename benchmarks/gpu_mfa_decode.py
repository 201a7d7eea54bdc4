"""The Triton MFA decode kernel on one GPU: its KV bandwidth against the device's copy
bandwidth and PyTorch SDPA, all measured in the same run.

Step-3's decode shape: 64 query heads sharing one K/V head of 256, one query token per
sequence, a paged cache (block size 16) whose blocks are handed out in shuffled order. The
kernel's effective bandwidth counts the K and V bytes it must read (B x context x 256 x 2 x
itemsize) over its median time (triton.testing.do_bench, L2 flushed between runs) replayed
from a CUDA graph, as a decode step would run it; "eager call us" times the plain Python call,
whose launch cost shows where it outlasts the L2 flush before it. The copy
bandwidth counts bytes read plus written by a device-to-device copy of a 2 GiB buffer. SDPA
runs `F.scaled_dot_product_attention(enable_gqa=True)` in bf16 on the same shape with each
sequence's K/V already contiguous (its FP8 rows repeat the bf16 SDPA time: it takes no FP8).

A script, not a test: `python benchmarks/gpu_mfa_decode.py [--sweep] [--partials]` prints
Markdown tables (`--sweep` first times every kernel config at B=128, 4K context; `--partials`
only compares fp32, bf16 and fp16 split partials).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_timing import copy_bandwidth, graph_us, median_us  # noqa: E402
from services.common.kernels.mfa_decode import (  # noqa: E402
    CONFIGS,
    KernelConfig,
    mfa_decode,
    mfa_decode_reference,
    num_splits_for,
)

HEADS, HEAD_DIM = 64, 256
SCALE = HEAD_DIM**-0.5
BATCHES = (32, 128, 256)
CONTEXTS = (4096, 32768)
FP8 = torch.float8_e4m3fn
# (BLOCK_N, warps, stages) tried by --sweep; K/V tiles load about (stages - 1) // 2 ahead.
SWEEP = [(16, 4, 7), (16, 4, 9), (32, 4, 3), (32, 4, 7)]


def paged_cache(batch: int, context: int, block_size: int):
    """q, k, v, block_tables, context_lens: every sequence `context` long, blocks shuffled."""
    blocks_per_seq = context // block_size
    num_blocks = batch * blocks_per_seq
    tables = torch.randperm(num_blocks, device="cuda").int().view(batch, blocks_per_seq)
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(num_blocks * block_size, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return q, k, v, tables, lens


def contiguous_kv(cache: torch.Tensor, tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """[num_slots, 1, D] paged -> [B, 1, L, D] each sequence's positions in order."""
    batch, blocks_per_seq = tables.shape
    offsets = torch.arange(block_size, device="cuda")
    slots = (tables.long()[:, :, None] * block_size + offsets).view(batch, -1)  # [B, L]
    return cache[slots].view(batch, -1, 1, HEAD_DIM).transpose(1, 2)


def assert_close(out: torch.Tensor, ref: torch.Tensor, what: str, bound: float = 5e-3) -> None:
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < bound, f"{what}: relative error {err:.2e}"


def sweep(block_size: int) -> None:
    batch, context = 128, 4096
    q, k, v, tables, lens = paged_cache(batch, context, block_size)
    k8, v8 = k.to(FP8), v.to(FP8)
    caches = ((k, v, {}), (k8, v8, dict(k_scale=1.0, v_scale=1.0)))
    print(f"\nConfig sweep, B={batch}, context={context}, block size {block_size}\n")
    print("| KV dtype | BLOCK_N | warps | stages | splits | kernel us | GB/s |")
    print("|---|---|---|---|---|---|---|")
    for (kk, vv, scales), (block_n, warps, stages), splits in itertools.product(
        caches, SWEEP, (1, 2)
    ):
        config = KernelConfig(block_n, warps, stages, programs_per_sm=1)  # splits are given
        args = (q, kk, vv, tables, lens, SCALE)
        kwargs = dict(block_size=block_size, num_splits=splits, config=config, **scales)
        try:
            mfa_decode(*args, **kwargs)
            us = median_us(lambda a=args, kw=kwargs: mfa_decode(*a, **kw))
            cells = f"{us:.1f} | {2 * kk.numel() * kk.element_size() / us / 1e3:.0f}"
        except Exception as e:  # a config that does not fit (shared memory) says why
            cells = f"{type(e).__name__} | -"
        print(f"| {kk.dtype} | {block_n} | {warps} | {stages} | {splits} | {cells} |", flush=True)
    del q, k, v, k8, v8
    torch.cuda.empty_cache()


def partials(block_size: int) -> None:
    """fp32 against 16-bit split partials, each timed and checked in this one run."""
    copy_bw = copy_bandwidth()
    print(f"\nSplit partials, block size {block_size}, copy {copy_bw / 1e9:.0f} GB/s\n")
    print("| B | context | splits | partials | kernel us | % of copy | rel. err vs fp32 ref |")
    print("|---|---|---|---|---|---|---|")
    for batch, context in ((128, 4096), (64, 8192), (32, 4096)):
        q, k, v, tables, lens = paged_cache(batch, context, block_size)
        ref = mfa_decode_reference(q[:4], k, v, tables[:4], lens[:4], SCALE, block_size=block_size)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            config = dataclasses.replace(CONFIGS["16bit"], partial_dtype=dtype)
            call = (q, k, v, tables, lens, SCALE)
            kwargs = dict(block_size=block_size, config=config)
            out = mfa_decode(*call, **kwargs)
            err = ((out[:4].float() - ref.float()).norm() / ref.float().norm()).item()
            us = graph_us(lambda c=call, kw=kwargs: mfa_decode(*c, **kw))
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            splits = num_splits_for(batch, context, sms * config.programs_per_sm)
            pct = 100 * 2 * k.numel() * k.element_size() / (us * 1e-6) / copy_bw
            print(
                f"| {batch} | {context} | {splits} | {dtype} | {us:.1f} | {pct:.0f}% | {err:.1e} |",
                flush=True,
            )
        del q, k, v
        torch.cuda.empty_cache()


def fp8_mma(block_size: int) -> None:
    """FP8 KV widened to fp16 on chip (the kernel today) against e4m3 tensor-core products,
    over a few tile shapes, each timed and checked against the float32 reference here."""
    copy_bw = copy_bandwidth()
    print(
        f"\nFP8 KV: widened vs e4m3 MMA, block size {block_size}, copy {copy_bw / 1e9:.0f} GB/s\n"
    )
    print("| B | context | config | kernel us | % of copy | rel. err vs fp32 ref |")
    print("|---|---|---|---|---|---|")
    base = CONFIGS["fp8"]
    qk = dataclasses.replace(base, fp8_mma=True, fp8_pv=False)
    both = dataclasses.replace(base, fp8_mma=True, v_transposed=True)
    variants = {
        "widened (now)": base,
        "e4m3 q k^T and p v": dataclasses.replace(base, fp8_mma=True),
        "e4m3 q k^T and p v, V read [D, N]": both,
        "same, 64-token tiles, 4 stages": dataclasses.replace(both, block_n=64, num_stages=4),
        "e4m3 q k^T only": qk,
        "e4m3 q k^T only, 5 stages": dataclasses.replace(qk, num_stages=5),
        "e4m3 q k^T only, 9 stages": dataclasses.replace(qk, num_stages=9),
        "e4m3 q k^T only, 64-token tiles, 4 stages": dataclasses.replace(
            qk, block_n=64, num_stages=4
        ),
    }
    for batch, context in ((128, 4096), (64, 8192), (32, 4096)):
        q, k, v, tables, lens = paged_cache(batch, context, block_size)
        k_scale = v_scale = 0.02
        k8, v8 = (k / k_scale).to(FP8), (v / v_scale).to(FP8)
        del k, v
        scales = dict(k_scale=k_scale, v_scale=v_scale, block_size=block_size)
        ref = mfa_decode_reference(q[:4], k8, v8, tables[:4], lens[:4], SCALE, **scales)
        for name, config in variants.items():
            call = (q, k8, v8, tables, lens, SCALE)
            kwargs = dict(config=config, **scales)
            try:
                out = mfa_decode(*call, **kwargs)
                err = ((out[:4].float() - ref.float()).norm() / ref.float().norm()).item()
                us = graph_us(lambda c=call, kw=kwargs: mfa_decode(*c, **kw))
                pct = 100 * 2 * k8.numel() / (us * 1e-6) / copy_bw
                cells = f"{us:.1f} | {pct:.0f}% | {err:.1e}"
            except Exception as e:  # noqa: BLE001 - a config that does not compile says why
                cells = f"{type(e).__name__}: {str(e)[:60]} | | "
            print(f"| {batch} | {context} | {name} | {cells} |", flush=True)
        del q, k8, v8
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="time every kernel config first")
    parser.add_argument("--partials", action="store_true", help="only compare partial dtypes")
    parser.add_argument("--fp8-mma", action="store_true", help="only compare FP8 KV products")
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    bs = args.block_size
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    if args.sweep:
        sweep(bs)
    if args.partials:
        partials(bs)
        return
    if args.fp8_mma:
        fp8_mma(bs)
        return

    copy_bw = copy_bandwidth()
    rows = []
    for batch, context in itertools.product(BATCHES, CONTEXTS):
        need = 4 * batch * context * HEAD_DIM * 2 * 1.2  # paged K, V and SDPA's copies of them
        if need > torch.cuda.mem_get_info()[0]:
            print(f"skipping B={batch}, context={context}: needs {need / 2**30:.0f} GiB")
            continue
        q, k, v, tables, lens = paged_cache(batch, context, bs)
        kv_bf16 = (k, v, {})
        k_seq, v_seq = contiguous_kv(k, tables, bs), contiguous_kv(v, tables, bs)
        q_sdpa = q[:, :, None, :]  # [B, H, 1, D]

        def sdpa(q_sdpa=q_sdpa, k_seq=k_seq, v_seq=v_seq):
            return F.scaled_dot_product_attention(
                q_sdpa, k_seq, v_seq, scale=SCALE, enable_gqa=True
            )

        sdpa_us = graph_us(sdpa)
        kernel_out = mfa_decode(q, k, v, tables, lens, SCALE)
        assert_close(kernel_out, sdpa()[:, :, 0], "kernel vs SDPA", bound=1e-2)
        del k_seq, v_seq
        torch.cuda.empty_cache()
        k_scale = v_scale = 0.02
        kv_fp8 = (
            (k / k_scale).to(FP8),
            (v / v_scale).to(FP8),
            dict(k_scale=k_scale, v_scale=v_scale),
        )
        for kk, vv, scales in (kv_bf16, kv_fp8):
            call = (q, kk, vv, tables, lens, SCALE)
            kwargs = dict(block_size=bs, **scales)
            out = mfa_decode(*call, **kwargs)
            few = (q[:2], kk, vv, tables[:2], lens[:2], SCALE)  # the reference is slow
            assert_close(out[:2], mfa_decode_reference(*few, **kwargs), f"{kk.dtype} B={batch}")
            eager_us = median_us(lambda c=call, kw=kwargs: mfa_decode(*c, **kw))
            us = graph_us(lambda c=call, kw=kwargs: mfa_decode(*c, **kw))
            kv_bytes = 2 * batch * context * HEAD_DIM * kk.element_size()
            config = CONFIGS["fp8" if kk.dtype == FP8 else "16bit"]
            splits = num_splits_for(batch, context, sms * config.programs_per_sm)
            gbs = kv_bytes / us * 1e-3
            rows.append((batch, context, kk.dtype, splits, us, eager_us, gbs, sdpa_us))
            print(f"B={batch} context={context} {kk.dtype}: {us:.1f} us", flush=True)
        del q, k, v, kv_fp8, kv_bf16
        torch.cuda.empty_cache()

    today = datetime.date.today().isoformat()
    print(
        f"\n{today}, {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
        f"triton {triton.__version__}; block size {bs}; device-to-device copy "
        f"{copy_bw / 1e9:.0f} GB/s (read + write)\n"
    )
    header = ("B", "context", "KV dtype", "splits", "kernel us", "GB/s", "% of copy")
    header += ("SDPA us (bf16)", "speedup", "eager call us")
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for batch, context, dtype, splits, us, eager_us, gbs, sdpa_us in rows:
        name = "bf16" if dtype == torch.bfloat16 else "fp8 e4m3"
        print(
            f"| {batch} | {context} | {name} | {splits} | {us:.1f} | {gbs:.0f} | "
            f"{100 * gbs * 1e9 / copy_bw:.0f}% | {sdpa_us:.1f} | {sdpa_us / us:.1f}x | "
            f"{eager_us:.1f} |"
        )


if __name__ == "__main__":
    main()
