"""Step-3 decode at 4K context under a 50 ms TPOT: AFD against colocated serving on the same
GPUs, projected to 61 layers from per-layer stage times measured on one H200.

Both deployments run the project's own code for every stage, at Step-3's real shapes, with
random weights in a block-FP8 checkpoint's form, served as an instance on Hopper serves them
(FP8 attention linears, dense-MLP slices and routed experts; a shared-expert slice that is not
whole 128-column blocks, 320 of 5120 at 16 FFN GPUs, is widened to bf16; routed experts on
their block scales through DeepGEMM, or with `--experts rows` requantised per row, the older
path) and an FP8 KV cache of 4096 positions per sequence:

- attention stage, t_A(b): one MFA layer for b decode tokens (norm, FP8 GEMMs, RoPE, KV
  write, the Triton decode kernel), then what an AFD attention instance adds per layer: the
  sum of the F FFN partials, the post-attention norm, the router and packing the FFN message
  (FP8 activations with per-token scales, expert ids and weights);
- FFN stage, t_F(n, F): `FFNHalf` of FFN instance 0 of F (split layout: 48/F routed
  experts, 1/F of the shared expert's or dense MLP's columns) for n tokens with uniformly
  random routing; MoE and dense layers separately.

Projection (the paper's pipeline, STEP3.md section 2):
- AFD, A attention GPUs + F FFN GPUs, 3 micro-batches of b tokens per attention GPU:
  TPOT = sum over the 61 layers (5 dense, 56 MoE) of 3 x max(t_A(b), t_F(A b, F)); the
  A-to-F-to-A transfers are assumed hidden inside the stage (the paper's assumption; they are
  not measured here, see below). tokens/GPU/s = 3 A b / TPOT / (A + F).
- Colocated, G GPUs, each running attention for its own B sequences and 1/G of every layer's
  feed-forward (expert parallelism) for all G B tokens: TPOT = sum over layers of
  t_A(B) + t_F(G B, G), with no micro-batch overlap and its all-to-all not counted (which
  favours colocated). tokens/GPU/s = B / TPOT.
Each is taken at the largest grid batch whose TPOT meets the SLA and whose KV cache fits
(61 layers x 512 B per position in FP8).

A script, not a test: `python benchmarks/gpu_decode_projection.py` prints Markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_attention_layer import (  # noqa: E402
    CFG,
    Fp8AttentionLayer,
    decode_cache,
    random_checkpoint,
    rms_norm,
)
from benchmarks.gpu_timing import graph_us  # noqa: E402
from services.common.activations import Layout  # noqa: E402
from services.common.kernels import grouped_gemm  # noqa: E402
from services.common.kernels.fp8 import (  # noqa: E402
    DEFAULT_BLOCK,
    FP8_DTYPE,
    dequantize_block_fp8,
    quantize_block_fp8,
)
from services.common.model.attention_half import FFNInput  # noqa: E402
from services.common.model.build import build_ffn_half  # noqa: E402
from services.common.model.ffn_half import FFNHalf, ShardSpec  # noqa: E402
from services.common.model.fp8_linear import pick_scaling  # noqa: E402
from services.common.model.moe import route  # noqa: E402
from services.common.model.weights import SCALE_SUFFIX  # noqa: E402
from services.common.presets import step3_config  # noqa: E402

CONTEXT, MICRO_BATCHES, SLA_MS, PAPER_TOKENS_PER_GPU_S = 4096, 3, 50.0, 4039
FULL = step3_config(61)
DENSE_LAYERS = FULL.num_hidden_layers - len(FULL.moe_layers)  # 5
MOE_LAYERS = len(FULL.moe_layers)  # 56
KV_BYTES_PER_SEQ = FULL.num_hidden_layers * 2 * FULL.head_dim * CONTEXT  # FP8 K + V
HBM_BYTES = 141e9
# Two layers of real shapes: 0 dense, 1 MoE; one FFN shard of them per F.
TWO_LAYERS = replace(step3_config(2), moe_layers=(1,))
AFD = ((16, 16), (20, 12), (24, 8))  # (attention GPUs, FFN GPUs): 32 GPUs, the paper's count
COLOCATED_GPUS = 32
BATCHES = (16, 32, 48, 64, 96, 128, 160, 192, 256)  # tokens per attention GPU per micro-batch
COLOCATED_BATCHES = (16, 32, 64, 96, 128, 192, 256, 384)


def ffn_checkpoint(experts: str) -> dict[str, torch.Tensor]:
    """TWO_LAYERS' feed-forward weights under the checkpoint's names, block FP8 as Step-3's
    FP8 checkpoint stores them (e4m3 + 128 x 128 `_scale_inv`), as the loader hands them to
    an FFN instance on Hopper. `experts`: "block" keeps the routed experts so (DeepGEMM's
    grouped GEMM), "rows" hands them over dequantised (requantised per row at build, the
    `torch._scaled_grouped_mm` path)."""
    h, inter, moe_inter = CFG.hidden_size, CFG.intermediate_size, CFG.moe_intermediate_size
    e, shared = CFG.moe_num_experts, CFG.share_expert_dim
    t = {}

    def put(name: str, *shape: int, wide: bool = False) -> None:
        w = torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * shape[-1] ** -0.5
        q, s = quantize_block_fp8(w)
        del w
        if wide:
            t[name] = dequantize_block_fp8(q, s, DEFAULT_BLOCK, torch.bfloat16)
        else:
            t[name], t[name + SCALE_SUFFIX] = q, s

    for name, width in {"0.mlp": inter, "1.share_expert": shared}.items():
        p = f"model.layers.{name}."
        put(p + "gate_proj.weight", width, h)
        put(p + "up_proj.weight", width, h)
        put(p + "down_proj.weight", h, width)
    p = "model.layers.1.moe."
    wide = experts == "rows"
    put(p + "gate_proj.weight", e, moe_inter, h, wide=wide)
    put(p + "up_proj.weight", e, moe_inter, h, wide=wide)
    put(p + "down_proj.weight", e, h, moe_inter, wide=wide)
    return t


class AttentionStage:
    """t_A(b): the MFA layer and the AFD attention instance's per-layer work around it."""

    def __init__(self, scaling: str) -> None:
        self.ckpt = random_checkpoint()
        self.scaling = scaling
        self.post_norm = rms_norm(1 + 0.1 * torch.randn(CFG.hidden_size, device="cuda"))
        self.router = torch.randn(CFG.moe_num_experts, CFG.hidden_size, device="cuda") * 0.02
        self.router = self.router.bfloat16()
        self.layout = Layout(CFG.hidden_size, CFG.moe_top_k, torch.bfloat16, fp8=True)

    def time_us(self, batch: int, num_partials: int) -> float:
        """One layer for `batch` tokens summing `num_partials` FFN outputs (0: colocated)."""
        layer = Fp8AttentionLayer(self.ckpt, self.scaling, decode_cache(batch, CONTEXT, FP8_DTYPE))
        x = torch.randn(batch, CFG.hidden_size, device="cuda", dtype=torch.bfloat16)
        partials = torch.randn(num_partials, batch, CFG.hidden_size, device="cuda").bfloat16()
        message = torch.empty(batch * self.layout.bytes_per_token, dtype=torch.uint8, device="cuda")

        def step():
            y = layer(x + partials.float().sum(0).bfloat16()) if num_partials else layer(x)
            h = self.post_norm(y)
            weights, ids = route(h @ self.router.T, CFG.moe_top_k, renormalize=False)
            if num_partials:
                self.layout.pack(message, h, ids, weights)

        return graph_us(step)


class FFNStage:
    """t_F(n, F) for a dense and a MoE layer: FFN instance 0 of F, split layout."""

    def __init__(self, experts: str) -> None:
        self.tensors = ffn_checkpoint(experts)
        self.shards: dict[int, FFNHalf] = {}

    def time_us(self, tokens: int, num_ffn: int) -> tuple[float, float]:
        if num_ffn not in self.shards:
            self.shards.clear()
            torch.cuda.empty_cache()
            spec = ShardSpec(0, num_ffn)
            self.shards[num_ffn] = build_ffn_half(TWO_LAYERS, self.tensors, spec, fp8_experts=True)
        shard = self.shards[num_ffn]
        h = torch.randn(tokens, CFG.hidden_size, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(tokens, CFG.moe_num_experts, device="cuda")
        weights, ids = route(logits, CFG.moe_top_k, renormalize=False)
        dense = graph_us(lambda: shard(0, FFNInput(h)))
        moe = graph_us(lambda: shard(1, FFNInput(h, ids, weights)))
        return dense, moe


def tpot_ms(per_layer_dense_us: float, per_layer_moe_us: float) -> float:
    return (DENSE_LAYERS * per_layer_dense_us + MOE_LAYERS * per_layer_moe_us) / 1e3


def fits(sequences_per_gpu: int, weight_bytes: float) -> bool:
    return sequences_per_gpu * KV_BYTES_PER_SEQ + weight_bytes < 0.9 * HBM_BYTES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument(
        "--experts", choices=("block", "rows"),
        default="block" if grouped_gemm.available("cuda") else "rows",
        help="routed experts as the checkpoint's blocks (DeepGEMM, the default where it "
        "runs) or requantised per row",
    )  # fmt: skip
    args = parser.parse_args()
    torch.manual_seed(0)
    scaling = pick_scaling("cuda")
    props = torch.cuda.get_device_properties(0)
    print(f"{datetime.date.today()}, {props.name}, torch {torch.__version__}; context {CONTEXT}, "
          f"FP8 KV, _scaled_mm {scaling}, experts {args.experts}; SLA {SLA_MS:g} ms TPOT\n",
          flush=True)  # fmt: skip
    attention, ffn = AttentionStage(scaling), FFNStage(args.experts)
    attn_weight_bytes = FULL.num_hidden_layers * 169_345_024  # FP8 attention linears

    print("| deployment | b | t_A us | t_F dense us | t_F MoE us | binds | TPOT ms | "
          "tokens/GPU/s | KV fits |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    best = {}
    for a, f in AFD:
        for b in args.batches:
            t_a = attention.time_us(b, f)
            t_dense, t_moe = ffn.time_us(a * b, f)
            tpot = MICRO_BATCHES * tpot_ms(max(t_a, t_dense), max(t_a, t_moe))
            rate = MICRO_BATCHES * a * b / (tpot / 1e3) / (a + f)
            ok = fits(MICRO_BATCHES * b, attn_weight_bytes)
            binds = "attention" if t_a >= t_moe else "FFN"
            print(f"| AFD {a}A+{f}F | {b} | {t_a:.0f} | {t_dense:.0f} | {t_moe:.0f} | {binds} | "
                  f"{tpot:.1f} | {rate:.0f} | {'yes' if ok else 'no'} |", flush=True)  # fmt: skip
            if tpot <= SLA_MS and ok:
                best[f"AFD {a}A+{f}F"] = (b, tpot, rate)
    g = COLOCATED_GPUS
    for batch in COLOCATED_BATCHES:
        t_a = attention.time_us(batch, 0)
        t_dense, t_moe = ffn.time_us(g * batch, g)
        tpot = tpot_ms(t_a + t_dense, t_a + t_moe)
        rate = batch / (tpot / 1e3)
        weights = attn_weight_bytes + 321e9 / g  # all FP8 weights, 1/G of the experts each
        ok = fits(batch, weights)
        cells = f"{t_a:.0f} | {t_dense:.0f} | {t_moe:.0f} | serial | {tpot:.1f} | {rate:.0f}"
        print(f"| colocated {g} GPUs | {batch} | {cells} | {'yes' if ok else 'no'} |", flush=True)
        if tpot <= SLA_MS and ok:
            best[f"colocated {g} GPUs"] = (batch, tpot, rate)

    print(f"\n| deployment | batch per GPU under {SLA_MS:g} ms | TPOT ms | tokens/GPU/s | "
          f"vs paper's {PAPER_TOKENS_PER_GPU_S} |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, (b, tpot, rate) in best.items():
        per_gpu = MICRO_BATCHES * b if name.startswith("AFD") else b
        print(f"| {name} | {per_gpu} | {tpot:.1f} | {rate:.0f} | "
              f"{rate / PAPER_TOKENS_PER_GPU_S:.2f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
