"""An FFN instance's layer per micro-batch, eager against replayed from a CUDA graph, at
Step-3's real shapes on one GPU.

FFN instance 0 of F (split layout: 48 / F routed experts in FP8 with per-row scales, 1 / F
of the dense MLP's and the shared expert's columns in bf16), random weights; a micro-batch
of n tokens, as the attention side routes them (softmax top-3 of random logits). Each time
is the mean over --iters back-to-back calls, host and device together (the eager layer is
launch-bound: its host time is its cost): `FFNHalf` called eagerly, and `FFNGraphs.run`
(copying the inputs into the static buffers, then one replay).

A script, not a test: `python benchmarks/gpu_ffn_graphs.py` prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.model.attention_half import FFNInput  # noqa: E402
from services.common.model.build import build_ffn_half  # noqa: E402
from services.common.model.ffn_half import ShardSpec  # noqa: E402
from services.common.model.moe import route  # noqa: E402
from services.common.model.schema import checkpoint_tensors, is_ffn_tensor  # noqa: E402
from services.common.presets import step3_config  # noqa: E402
from services.ffn.ffn_graphs import FFNGraphs  # noqa: E402

CFG = replace(step3_config(2), moe_layers=(1,))  # layer 0 dense, layer 1 MoE


def shard(num_ffn: int):
    tensors = {
        name: torch.randn(shape, device="cuda", dtype=torch.bfloat16) * shape[-1] ** -0.5
        for name, shape in checkpoint_tensors(CFG).items()
        if is_ffn_tensor(name)
    }
    return build_ffn_half(CFG, tensors, ShardSpec(0, num_ffn), fp8_experts=True)


def mean_us(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def rows(num_ffn: int, tokens: list[int], iters: int) -> list[str]:
    ffn = shard(num_ffn)
    graphs = FFNGraphs(ffn, max(tokens), torch.bfloat16)
    out = []
    for n in tokens:
        h = torch.randn(n, CFG.hidden_size, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(n, CFG.moe_num_experts, device="cuda")
        weights, ids = route(logits, CFG.moe_top_k, renormalize=False)
        for index, (layer, x) in enumerate(
            (("dense", FFNInput(h)), ("MoE", FFNInput(h, ids, weights)))
        ):
            eager = mean_us(lambda: ffn(index, x), iters)  # noqa: B023
            graph = mean_us(lambda: graphs.run(index, x), iters)  # noqa: B023
            out.append(
                f"| {num_ffn} | {n} | {layer} | {eager:.0f} | {graph:.0f} | {eager / graph:.2f} |"
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ffn", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| F | n | layer | eager us | graph us | eager / graph |")
    print("|---|---|---|---|---|---|")
    for num_ffn in args.ffn:
        print("\n".join(rows(num_ffn, args.tokens, args.iters)), flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
