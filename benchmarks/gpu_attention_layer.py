"""One Step-3 MFA attention layer on one GPU at the paper's Table 9 setup, part by part,
against the HBM floor, the 200 us target, the paper's 281 us (H800) and naive PyTorch.

Setup (Table 9: one attention layer including its linears, batch 64 per GPU, 8K context, FP8
GEMMs, BF16 attention): 64 decode tokens, each with 8192 positions of context (its own new
token the last) in a paged bf16 KV cache of block size 16 whose blocks are handed out shuffled;
random block-FP8 (128 x 128) weights at Step-3's shapes. The layer as an engine runs it:

    h = input_layernorm(x)
    q_low | k | v = qkv(h)               one FP8 GEMM, q_proj | k_proj | v_proj fused: 7168 -> 2560
    q = wq(inter_norm(q_low))            FP8 GEMM 2048 -> 64 x 256
    q, k = rope(q), rope(k)              rotate-half, theta 5e5 (cos/sin made once per step)
    cache[new slots] = k, v
    a = mfa_decode(q, cache)             Triton, bf16 KV
    x = x + o_proj(a)                    FP8 GEMM 16384 -> 7168

Every FP8 GEMM quantises its input per 1 x 128 group on the fly (Triton) and multiplies
through `torch._scaled_mm` (services/common/model/fp8_linear.py). Times are medians of CUDA
graph replays with the L2 flushed before each (triton's do_bench, as benchmarks/
gpu_mfa_decode.py does): the whole layer, then each part alone on recorded inputs: the GEMMs,
the attention kernel, and "the rest" (the layer with GEMMs and attention replaced by their
recorded outputs). The HBM floor is the KV bytes read plus the FP8 weight bytes, at the
device-to-device copy bandwidth measured in the same run. The naive version is GPU.md's:
separate per-tensor-scaled `_scaled_mm` projections and SDPA (`enable_gqa`) over a contiguous
copy of the cache. Both are checked against a float32 reference of the attention branch.

A script, not a test: `python benchmarks/gpu_attention_layer.py` prints Markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_mfa_decode import contiguous_kv, paged_cache  # noqa: E402
from benchmarks.gpu_timing import copy_bandwidth, graph_us, median_us  # noqa: E402
from services.common.kernels.fp8 import FP8_DTYPE, FP8_MAX, quantize_block_fp8  # noqa: E402
from services.common.kernels.fp8_norm import rms_norm_quantize  # noqa: E402
from services.common.kernels.kv_write import write_kv  # noqa: E402
from services.common.kernels.mfa_decode import mfa_decode, mfa_decode_reference  # noqa: E402
from services.common.kernels.norm_rope import rope, rope_qk  # noqa: E402
from services.common.model.attention import MFAAttention  # noqa: E402
from services.common.model.fp8_attention import Fp8MFAAttention  # noqa: E402
from services.common.model.fp8_linear import Fp8Linear, fuse_outputs, pick_scaling  # noqa: E402
from services.common.model.kernel_choice import choose_kernels  # noqa: E402
from services.common.model.layers import RMSNorm, rope_cos_sin  # noqa: E402
from services.common.presets import step3_config  # noqa: E402

BATCH, CONTEXT, PAGE = 64, 8192, 16
TARGET_US, PAPER_H800_US, NAIVE_GPU_MD_US = 200.0, 281.0, 809.0
# The FP8 layer's attention branch against float32: three chained e4m3 activation
# quantisations (h, inter_norm(q_low), the attention output; ~2.6% each) compound to ~4-5%.
BRANCH_REL_ERR = 1e-1
CFG = step3_config(1)
H, R, D, HEADS = CFG.hidden_size, CFG.share_q_dim, CFG.head_dim, CFG.num_attention_heads
SCALE = D**-0.5


def random_checkpoint() -> dict:
    """Block-FP8 (weight, weight_scale_inv) pairs and norm weights of one attention layer."""
    shapes = {"q_proj": (R, H), "k_proj": (D, H), "v_proj": (D, H)}
    shapes |= {"wq": (HEADS * D, R), "o_proj": (H, HEADS * D)}
    ckpt = {
        name: quantize_block_fp8(torch.randn(out_f, in_f, device="cuda") * in_f**-0.5)
        for name, (out_f, in_f) in shapes.items()
    }
    ckpt["input_layernorm"] = 1 + 0.1 * torch.randn(H, device="cuda")
    ckpt["inter_norm"] = 1 + 0.1 * torch.randn(R, device="cuda")
    return ckpt


def rms_norm(weight: torch.Tensor) -> RMSNorm:
    norm = RMSNorm(weight.numel(), CFG.rms_norm_eps).cuda()
    norm.weight.data.copy_(weight)
    choose_kernels(norm)  # the Triton RMSNorm, as a model built on the GPU has it
    return norm


class Fp8AttentionLayer:
    """The layer with FP8 GEMMs and the paged decode kernel. x [B, H] bf16 -> [B, H] bf16."""

    def __init__(self, ckpt: dict, scaling: str, cache: dict) -> None:
        qkv = fuse_outputs(ckpt["q_proj"], ckpt["k_proj"], ckpt["v_proj"])
        self.qkv = Fp8Linear.from_block_fp8(*qkv, scaling)
        self.wq = Fp8Linear.from_block_fp8(*ckpt["wq"], scaling)
        self.o_proj = Fp8Linear.from_block_fp8(*ckpt["o_proj"], scaling)
        self.input_norm = rms_norm(ckpt["input_layernorm"])
        self.inter_norm = rms_norm(ckpt["inter_norm"])
        self.cache = cache

    def gemm(self, linear: Fp8Linear, xq: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        return cublas_matmul(linear, xq, x_scale)

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        c = self.cache
        return mfa_decode(
            q, c["k"], c["v"], c["tables"], c["lens"], SCALE, block_size=PAGE,
            k_scale=c.get("kv_scale"), v_scale=c.get("kv_scale"),
        )  # fmt: skip

    def linear(self, linear: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
        return self.gemm(linear, *linear.quantize_input(x))[: x.shape[0]]

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        c, batch = self.cache, x.shape[0]
        h = self.input_norm(x)
        q_low, k, v = self.linear(self.qkv, h).split((R, D, D), dim=-1)  # [B, 2048 | 256 | 256]
        q = self.linear(self.wq, self.inter_norm(q_low)).view(batch, HEADS, D)  # [B, 64, 256]
        q = rope(q, c["cos"], c["sin"])
        k = rope(k.view(batch, 1, D), c["cos"], c["sin"])  # [B, 1, 256]
        write_slots(c["k"], c["new_slots"], k)
        write_slots(c["v"], c["new_slots"], v.view(batch, 1, D))
        a = self.attend(q)  # [B, 64, 256]
        return self.linear(self.o_proj, a.view(batch, HEADS * D))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class RecordingLayer(Fp8AttentionLayer):
    """Runs the layer and keeps each GEMM's and the attention kernel's inputs and output."""

    def __init__(self, layer: Fp8AttentionLayer) -> None:
        self.__dict__.update(layer.__dict__)
        self.seen = {}

    def gemm(self, linear, xq, x_scale):
        out = super().gemm(linear, xq, x_scale)
        self.seen[linear] = (xq, x_scale, out)
        return out

    def attend(self, q):
        out = super().attend(q)
        self.seen["attention"] = (q, out)
        return out


class RestOfLayer(Fp8AttentionLayer):
    """The layer with its GEMMs and attention kernel replaced by their recorded outputs."""

    def __init__(self, recorded: RecordingLayer) -> None:
        self.__dict__.update(recorded.__dict__)

    def gemm(self, linear, xq, x_scale):
        return self.seen[linear][2]

    def attend(self, q):
        return self.seen["attention"][1]


class NaiveAttentionLayer:
    """GPU.md's naive PyTorch: per-tensor FP8 `_scaled_mm` per projection, SDPA over
    contiguous K/V [B, 1, L, D] (which it keeps up to date itself)."""

    def __init__(self, layer: Fp8AttentionLayer, k_seq: torch.Tensor, v_seq: torch.Tensor):
        w_qkv = layer.qkv.dequantized_weight()
        parts = dict(zip(("q_proj", "k_proj", "v_proj"), w_qkv.split((R, D, D)), strict=True))
        parts |= {"wq": layer.wq.dequantized_weight(), "o_proj": layer.o_proj.dequantized_weight()}
        self.weights = {name: per_tensor_fp8(w) for name, w in parts.items()}
        self.input_norm, self.inter_norm = layer.input_norm, layer.inter_norm
        self.cos, self.sin = layer.cache["cos"], layer.cache["sin"]
        self.k_seq, self.v_seq = k_seq, v_seq

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w8, w_scale = self.weights[name]
        xq, x_scale = per_tensor_fp8(x)
        return torch._scaled_mm(
            xq, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16
        )

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        h = self.input_norm(x)
        q = self.linear("wq", self.inter_norm(self.linear("q_proj", h))).view(batch, HEADS, D)
        k = self.linear("k_proj", h).view(batch, 1, D)
        v = self.linear("v_proj", h).view(batch, 1, D)
        q, k = rope(q, self.cos, self.sin), rope(k, self.cos, self.sin)
        self.k_seq[:, :, -1], self.v_seq[:, :, -1] = k, v
        a = F.scaled_dot_product_attention(
            q[:, :, None], self.k_seq, self.v_seq, scale=SCALE, enable_gqa=True
        )  # [B, 64, 1, 256]
        return self.linear("o_proj", a.reshape(batch, HEADS * D))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


def cublas_matmul(linear: Fp8Linear, xq: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
    """`Fp8Linear.matmul` as it was before the Triton GEMM: cuBLASLt at every shape."""
    blockwise = linear.scaling == "blockwise"
    w_scale = linear.weight_scale.t() if blockwise else linear.weight_scale.view(1, -1)
    return torch._scaled_mm(
        xq, linear.weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16
    )


class DecodeBackend:
    """The attention instance's `PagedAttention` for one decode step, on the script's cache:
    write the new K/V (`KVCache.write`'s kernel), run the decode kernel."""

    def __init__(self, cache: dict) -> None:
        self.cache = cache

    def __call__(self, layer: int, q, k, v) -> torch.Tensor:
        c = self.cache
        write_kv(c["k"], c["v"], c["new_slots"], k, v)
        return mfa_decode(
            q, c["k"], c["v"], c["tables"], c["lens"], SCALE, block_size=PAGE,
            k_scale=c.get("kv_scale"), v_scale=c.get("kv_scale"),
        )  # fmt: skip


def model_layer(ckpt: dict) -> Fp8MFAAttention:
    """The model's own attention module on the same weights, as `build.py` makes it for an
    attention instance on a GPU: five blockwise `Fp8Linear`s, run as `Fp8MFAAttention`."""
    with torch.device("meta"):
        attn = MFAAttention(CFG, layer=0)
    for name in ("q_proj", "k_proj", "v_proj", "wq", "o_proj"):
        attn.set_submodule(name, Fp8Linear.from_block_fp8(*ckpt[name], "blockwise"))
    attn.inter_norm = rms_norm(ckpt["inter_norm"])
    return Fp8MFAAttention.from_module(attn)


def write_slots(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """cache[slots] = x in the cache's dtype, through bytes (index_copy_ has no FP8 kernel)."""
    cache.view(torch.uint8).index_copy_(0, slots, x.to(cache.dtype).view(torch.uint8))


def decode_cache(batch: int, context: int, kv_dtype: torch.dtype = torch.bfloat16) -> dict:
    """A step's paged cache (shuffled blocks), new-token slots and RoPE tables: `batch`
    sequences of `context` positions whose new token is the last. FP8 K/V get scale 1."""
    _, k_cache, v_cache, tables, lens = paged_cache(batch, context, PAGE)
    last = context - 1
    new_slots = (tables[:, last // PAGE].long() * PAGE + last % PAGE).contiguous()
    positions = torch.full((batch,), last, device="cuda")
    cos, sin = rope_cos_sin(positions, D, CFG.rope_theta)  # [B, 256] each, once per step
    cache = dict(k=k_cache.to(kv_dtype), v=v_cache.to(kv_dtype), tables=tables, lens=lens)
    cache |= dict(new_slots=new_slots, cos=cos, sin=sin)
    if kv_dtype == FP8_DTYPE:
        cache["kv_scale"] = 1.0
    return cache


def per_tensor_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax().float() / FP8_MAX
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def reference_branch(layer: Fp8AttentionLayer, x: torch.Tensor) -> torch.Tensor:
    """The attention branch in float32 on the dequantised weights, unquantised activations."""
    c, batch = layer.cache, x.shape[0]
    h = layer.input_norm(x.float())
    q_low, k, v = (h @ layer.qkv.dequantized_weight().T).split((R, D, D), dim=-1)
    q = (layer.inter_norm(q_low) @ layer.wq.dequantized_weight().T).view(batch, HEADS, D)
    q = rope(q, c["cos"], c["sin"])
    k = rope(k.reshape(batch, 1, D), c["cos"], c["sin"])
    c["k"].index_copy_(0, c["new_slots"], k.bfloat16())  # the cache holds bf16
    c["v"].index_copy_(0, c["new_slots"], v.reshape(batch, 1, D).bfloat16())
    a = mfa_decode_reference(q, c["k"], c["v"], c["tables"], c["lens"], SCALE, block_size=PAGE)
    return a.reshape(batch, HEADS * D) @ layer.o_proj.dequantized_weight().T


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def rest_parts(layer: Fp8AttentionLayer, seen: dict, x: torch.Tensor) -> list[tuple[str, float]]:
    """Each piece of "the rest" alone, on the inputs the layer gave it."""
    c, batch = layer.cache, x.shape[0]
    h = layer.input_norm(x)
    q_low, k, v = seen[layer.qkv][2][:batch].split((R, D, D), dim=-1)
    q_normed = layer.inter_norm(q_low)
    q = seen[layer.wq][2][:batch].view(batch, HEADS, D)
    k = k.reshape(batch, 1, D)
    a = seen["attention"][1].view(batch, HEADS * D)
    o = seen[layer.o_proj][2][:batch]
    cos, sin = c["cos"], c["sin"]
    pieces = {
        "input_layernorm (RMSNorm, fp32 math)": lambda: layer.input_norm(x),
        "inter_norm (RMSNorm, fp32 math)": lambda: layer.inter_norm(q_low),
        "1x128 quantisation of h": lambda: layer.qkv.quantize_input(h),
        "1x128 quantisation of inter_norm(q)": lambda: layer.wq.quantize_input(q_normed),
        "1x128 quantisation of the attention output": lambda: layer.o_proj.quantize_input(a),
        "RoPE on q [64, 64, 256]": lambda: rope(q, cos, sin),
        "RoPE on k [64, 1, 256]": lambda: rope(k, cos, sin),
        "KV write (2 index_copy_)": lambda: (
            c["k"].index_copy_(0, c["new_slots"], k),
            c["v"].index_copy_(0, c["new_slots"], v.reshape(batch, 1, D)),
        ),
        "residual add": lambda: x + o,
    }
    return [(name, graph_us(fn)) for name, fn in pieces.items()]


def gemm_variants(layer: Fp8AttentionLayer, seen: dict, scaling: str) -> list[tuple]:
    """Each GEMM's time by scaling mode and operand order, and bf16 torch.mm, on one input."""
    rows = []
    for name, linear in (("qkv", layer.qkv), ("wq", layer.wq), ("o_proj", layer.o_proj)):
        xq, x_scale, _ = seen[linear]
        w_bf16 = linear.dequantized_weight().bfloat16()
        x_bf16 = torch.randn(xq.shape, device="cuda", dtype=torch.bfloat16)
        variants = {
            f"{scaling} (the layer's)": lambda lin=linear, a=xq, s=x_scale: lin.matmul(a, s)
        }
        if scaling == "blockwise":
            # W x^T: the 128 x 128-scaled weight as cuBLASLt's A operand, tokens as N.
            variants["blockwise, swapped (W x^T)"] = lambda lin=linear, a=xq, s=x_scale: (
                torch._scaled_mm(
                    lin.weight, a.t(), scale_a=lin.weight_scale, scale_b=s.t(),
                    out_dtype=torch.bfloat16,
                ).t()
            )  # fmt: skip
            rowwise = Fp8Linear.from_block_fp8(linear.weight, linear.weight_scale, "rowwise")
            rq, rs = rowwise.quantize_input(x_bf16)
            variants["rowwise (requantised weight)"] = lambda lin=rowwise, a=rq, s=rs: lin.matmul(
                a, s
            )
        variants["bf16 torch.mm (dequantised weight)"] = lambda w=w_bf16, a=x_bf16: a @ w.T
        for variant, fn in variants.items():
            try:
                us = graph_us(fn)
            except RuntimeError as e:
                rows.append((name, variant, None, str(e).splitlines()[0][:60]))
                continue
            weight_bytes = w_bf16.numel() * (2 if variant.startswith("bf16") else 1)
            rows.append((name, variant, us, f"{weight_bytes / us * 1e-3:.0f} GB/s of weights"))
        del w_bf16
    return rows


def model_layer_table(
    fused: Fp8MFAAttention,
    layer: Fp8AttentionLayer,
    seen: dict,
    x: torch.Tensor,
    ref: torch.Tensor,
    before_us: float,
    floor_us: float,
) -> None:
    """The model's fused layer against the hand-built one above (cuBLASLt everywhere, each
    small op its own kernel), and its parts: the GEMMs as `Fp8Linear.matmul` now dispatches
    them, and RMSNorm + quantisation as one kernel against two."""
    c, norm = layer.cache, layer.input_norm
    backend = DecodeBackend(c)

    def step() -> torch.Tensor:
        return fused.residual_forward(x, norm, c["cos"], c["sin"], backend)

    err = rel_err(fused.branch(x, norm, c["cos"], c["sin"], backend), ref)
    model_us = graph_us(step)
    rows = [("**whole layer, the model's `Fp8MFAAttention`** (CUDA graph)", model_us)]
    rows.append(("whole layer, hand-built as before (cuBLASLt, unfused)", before_us))
    (q_xq, q_xs, _), (w_xq, w_xs, _), (o_xq, o_xs, _) = (
        seen[lin] for lin in (layer.qkv, layer.wq, layer.o_proj)
    )
    for name, lin, before, xq, xs, res in (
        ("qkv", fused.qkv, layer.qkv, q_xq, q_xs, None),
        ("wq", fused.wq, layer.wq, w_xq, w_xs, None),
        ("o_proj + residual", fused.o_proj, layer.o_proj, o_xq, o_xs, x),
    ):
        new_us = graph_us(lambda lin=lin, a=xq, s=xs, r=res: lin.matmul(a, s, r))
        old_us = graph_us(lambda lin=before, a=xq, s=xs: cublas_matmul(lin, a, s))
        rows += [(f"- {name}, `Fp8Linear.matmul`", new_us), (f"- {name}, cuBLASLt", old_us)]
    rows.append(
        (
            "- input RMSNorm + 1x128 quantisation, fused",
            graph_us(lambda: rms_norm_quantize(x, norm.weight, norm.eps, 16)),
        )
    )
    rows.append(
        ("- input RMSNorm, then quantisation", graph_us(lambda: layer.qkv.quantize_input(norm(x))))
    )
    q_low, k, v = seen[layer.qkv][2][: x.shape[0]].split((R, D, D), dim=-1)
    q, k, v = seen[layer.wq][2][: x.shape[0]].view(-1, HEADS, D), k[:, None], v[:, None]
    cos, sin = c["cos"], c["sin"]
    rows.append(("- RoPE on q and k, one launch", graph_us(lambda: rope_qk(q, k, cos, sin))))
    rows.append(
        ("- KV write, one launch", graph_us(lambda: write_kv(c["k"], c["v"], c["new_slots"], k, v)))
    )
    print("\n| model's layer | us |")
    print("|---|---|")
    for what, us in rows:
        print(f"| {what} | {us:.1f} |")
    print(
        f"\nModel's layer {model_us:.1f} us: {before_us / model_us:.2f}x faster than the "
        f"hand-built cuBLASLt layer ({before_us:.1f} us) in the same run; "
        f"{model_us / floor_us:.2f}x the HBM floor; attention branch vs float32 {err:.2e}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scaling", choices=("blockwise", "rowwise"), default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    scaling = args.scaling or pick_scaling("cuda")
    print(f"_scaled_mm scaling: {scaling}", flush=True)
    copy_bw = copy_bandwidth()

    cache = decode_cache(BATCH, CONTEXT)
    k_cache, tables = cache["k"], cache["tables"]
    ckpt = random_checkpoint()
    layer = Fp8AttentionLayer(ckpt, scaling, cache)
    naive = NaiveAttentionLayer(
        layer, contiguous_kv(k_cache, tables, PAGE), contiguous_kv(cache["v"], tables, PAGE)
    )
    x = torch.randn(BATCH, H, device="cuda", dtype=torch.bfloat16)

    # Correctness first: both branches against float32 (which leaves its own K/V in the cache).
    recorded = RecordingLayer(layer)
    fast_branch, naive_branch = recorded.branch(x), naive.branch(x)
    ref = reference_branch(layer, x)
    fast_err, naive_err = rel_err(fast_branch, ref), rel_err(naive_branch, ref)
    print(f"attention branch vs float32: FP8 layer {fast_err:.2e}, naive {naive_err:.2e}")

    whole_us = graph_us(lambda: layer(x))
    eager_us = median_us(lambda: layer(x))
    seen = recorded.seen
    gemms = [(lin, *seen[lin][:2]) for lin in (layer.qkv, layer.wq, layer.o_proj)]
    gemm_us = [graph_us(lambda g=g: g[0].matmul(g[1], g[2])) for g in gemms]
    all_gemms_us = graph_us(lambda: [lin.matmul(xq, s) for lin, xq, s in gemms])
    attn_us = graph_us(lambda: layer.attend(seen["attention"][0]))
    rest = RestOfLayer(recorded)
    rest_us = graph_us(lambda: rest(x))
    rest_pieces = rest_parts(layer, seen, x)
    naive_us = graph_us(lambda: naive(x))
    naive_eager_us = median_us(lambda: naive(x))
    variants = gemm_variants(layer, seen, scaling)

    kv_bytes = 2 * BATCH * CONTEXT * D * k_cache.element_size()
    w_bytes = [lin.weight.numel() for lin, _, _ in gemms]
    floor_us = (kv_bytes + sum(w_bytes)) / copy_bw * 1e6

    def row(what: str, us: float, nbytes: int | None = None, note: str = "") -> str:
        moved = "-" if nbytes is None else f"{nbytes / 1e6:.1f}"
        bw = "-" if nbytes is None else f"{nbytes / us * 1e-3:.0f}"
        pct = "-" if nbytes is None else f"{100 * nbytes / us * 1e6 / copy_bw:.0f}%"
        return f"| {what} | {us:.1f} | {moved} | {bw} | {pct} | {note} |"

    today = datetime.date.today().isoformat()
    print(
        f"\n{today}, {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), triton {triton.__version__}; B={BATCH}, context {CONTEXT}, "
        f"paged bf16 KV (block {PAGE}, shuffled), FP8 GEMMs via _scaled_mm {scaling}; "
        f"device-to-device copy {copy_bw / 1e9:.0f} GB/s (read + write)\n"
    )
    print("| part | us | MB read | GB/s | % of copy BW | note |")
    print("|---|---|---|---|---|---|")
    print(row("**whole layer** (CUDA graph)", whole_us, kv_bytes + sum(w_bytes), "KV + weights"))
    print(row("GEMMs, all three (one graph)", all_gemms_us, sum(w_bytes)))
    names = ("q_proj+k_proj+v_proj 7168->2560", "wq 2048->16384", "o_proj 16384->7168")
    for name, us, nbytes in zip(names, gemm_us, w_bytes, strict=True):
        print(row(f"- {name}", us, nbytes, "on its recorded FP8 input"))
    print(row("attention kernel (mfa_decode)", attn_us, kv_bytes, "bf16 K + V"))
    print(row("the rest", rest_us, None, "2 RMSNorms, 3 act. quants, RoPE, KV write, residual"))
    for name, us in rest_pieces:
        print(row(f"- {name}", us, None, "alone"))
    print(row("sum of the parts", all_gemms_us + attn_us + rest_us, None))
    print(row("whole layer, eager (Python launches)", eager_us, None))
    print(row("HBM floor", floor_us, kv_bytes + sum(w_bytes), "at the copy bandwidth"))
    print(f"| target | {TARGET_US:.0f} | | | | |")
    print(f"| paper, H800 (Table 9) | {PAPER_H800_US:.0f} | | | | 3.35 TB/s HBM |")
    print(row("naive PyTorch (CUDA graph)", naive_us, None, "per-tensor scaled_mm + SDPA"))
    print(row("naive PyTorch, eager", naive_eager_us, None, f"GPU.md: {NAIVE_GPU_MD_US:.0f}"))

    print("\n| GEMM | variant | us | note |")
    print("|---|---|---|---|")
    for name, variant, us, note in variants:
        print(f"| {name} | {variant} | {'-' if us is None else f'{us:.1f}'} | {note} |")

    if scaling == "blockwise":
        model_layer_table(model_layer(ckpt), layer, seen, x, ref, whole_us, floor_us)

    verdict = "meets" if whole_us <= TARGET_US else f"misses by {whole_us - TARGET_US:.0f} us"
    print(
        f"\nWhole layer {whole_us:.0f} us: {verdict} the {TARGET_US:.0f} us target; "
        f"{whole_us / floor_us:.2f}x the HBM floor ({floor_us:.0f} us); "
        f"{whole_us / PAPER_H800_US:.2f}x the paper's {PAPER_H800_US:.0f} us on H800; "
        f"{naive_us / whole_us:.1f}x faster than naive PyTorch ({naive_us:.0f} us). "
        f"Attention branch vs float32: {fast_err:.2e} (naive {naive_err:.2e})."
    )
    if fast_err > BRANCH_REL_ERR:
        sys.exit(f"FP8 layer's branch error {fast_err:.2e} exceeds {BRANCH_REL_ERR:.0e}")


if __name__ == "__main__":
    main()
