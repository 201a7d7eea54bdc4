"""Model construction: the attention half, an FFN half (a shard) or the whole model from a
checkpoint's tensors, and the one place where FP8 is chosen.

FP8: on a GPU, a block-FP8 checkpoint's linears stay FP8 (`fp8_weights_on`): MFA's five
projections, the dense MLPs and the shared experts as `Fp8Linear`s with the checkpoint's own
128 x 128 block scales; the routed experts as stored too (`BlockFp8Experts`, DeepGEMM's
block-scaled grouped GEMM) where DeepGEMM loads (Hopper), else as `Fp8Experts` (requantised
to per-row scales, the mode `torch._scaled_grouped_mm` takes). On a CPU every weight is widened.
An attention layer whose linears all became blockwise FP8 on a GPU runs as an
`Fp8MFAAttention` (fused).

Kernels: once a half's weights are in place, every layer of it gets its Triton kernels or
plain torch for where its weights are (`kernel_choice.py`), for both halves, however built.

The attention half is built on the meta device and the loaded tensors assigned in place, so
no weight is ever held twice; an FFN half is built layer by layer from a reader, so only one
layer's whole tensors are in memory at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from services.common.config import ModelConfig, load_config
from services.common.kernels.fp8 import DEFAULT_BLOCK, FP8_DTYPE, dequantize_block_fp8
from services.common.model import block_fp8_moe
from services.common.model.attention_half import AttentionHalf
from services.common.model.block_fp8_moe import BlockFp8Experts
from services.common.model.ffn_half import (
    BlockFp8RoutedExperts,
    DenseFFN,
    FFNHalf,
    Fp8RoutedExperts,
    MoEFFN,
    RoutedExperts,
    ShardSpec,
)
from services.common.model.fp8_attention import fuse_attention
from services.common.model.fp8_linear import GROUP, Fp8Linear, pick_scaling
from services.common.model.fp8_moe import Fp8Experts
from services.common.model.kernel_choice import choose_kernels
from services.common.model.layers import SwiGLU
from services.common.model.schema import (
    is_attention_linear,
    is_ffn_tensor,
    is_mlp_linear,
    is_routed_expert,
)
from services.common.model.step3 import Step3ForCausalLM
from services.common.model.weights import SCALE_SUFFIX, Checkpoint

DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
}
PREFIX = "model."  # the checkpoint's names are the halves' module names behind it

WHOLE = ShardSpec()  # the whole feed-forward as one shard

# The whole checkpoint's FFN tensors, or a reader of one layer's.
FFNTensors = Mapping[str, Tensor] | Callable[[int], Mapping[str, Tensor]]


def resolve_dtype(name: str, cfg: ModelConfig) -> torch.dtype:
    """`auto` is the checkpoint's own `torch_dtype`."""
    if name == "auto":
        name = cfg.torch_dtype
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def fp8_weights_on(device: str | torch.device) -> Callable[[str], bool] | None:
    """Which block-FP8 weights the loader keeps as FP8 on `device`: every linear an FP8 GEMM
    serves on a GPU (MFA's projections, dense MLPs, shared experts), and the routed experts
    where DeepGEMM's block-scaled grouped GEMM runs (Hopper); none on a CPU, where plain
    matmuls want wide weights. (Elsewhere routed experts load wide and are requantised.)"""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    experts = block_fp8_moe.runs_on(device)
    return lambda name: (
        is_attention_linear(name) or is_mlp_linear(name) or (experts and is_routed_expert(name))
    )


def fp8_experts_for(checkpoint: Checkpoint, device: str | torch.device) -> bool:
    """Whether routed experts run as FP8 grouped GEMMs: a block-FP8 checkpoint on a GPU."""
    return torch.device(device).type == "cuda" and any(
        ".moe." in name and name.endswith("_proj.weight") for name in checkpoint.fp8_names
    )


def build_attention_half(cfg: ModelConfig, tensors: Mapping[str, Tensor]) -> AttentionHalf:
    """Assign `tensors` (every attention-side checkpoint tensor, in dtype and on device)."""
    with torch.device("meta"):
        half = AttentionHalf(cfg)
    fp8 = {n: t for n, t in tensors.items() if t.dtype == FP8_DTYPE}
    wide = {
        n.removeprefix(PREFIX): t
        for n, t in tensors.items()
        if n not in fp8 and n.removesuffix(SCALE_SUFFIX) not in fp8
    }
    result = half.load_state_dict(wide, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"tensors the model does not have: {result.unexpected_keys[:5]}")
    for name, weight in fp8.items():
        linear = _fp8_linear(weight, tensors[name + SCALE_SUFFIX])
        half.set_submodule(name.removeprefix(PREFIX).removesuffix(".weight"), linear)
    missing = [n for n in result.missing_keys if PREFIX + n not in fp8]
    if missing:
        raise ValueError(f"tensors missing for the attention half: {missing[:5]}")
    fuse_attention(half)  # layers whose linears are all blockwise FP8 on a GPU
    choose_kernels(half)  # the Triton kernels where the weights are on a GPU
    return half.eval().requires_grad_(False)


def build_ffn_half(
    cfg: ModelConfig,
    tensors: FFNTensors,
    spec: ShardSpec = WHOLE,
    fp8_experts: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> FFNHalf:
    """Shard `spec` of every layer's feed-forward from the checkpoint's FFN tensors (whole,
    unsliced: this slices them). `fp8_experts`: hold the routed experts in e4m3 with per-row
    scales (a GPU serving a block-FP8 checkpoint): half the bytes, FP8 grouped GEMMs. `dtype`:
    what an FP8 weight cut off its 128-wide blocks is widened to."""
    if spec.num_shards > cfg.moe_num_experts and cfg.moe_layers:
        raise ValueError(
            f"{spec.num_shards} FFN instances for {cfg.moe_num_experts} experts: "
            "some instance would hold none; use fewer FFN instances"
        )
    layers = []
    for layer in range(cfg.num_hidden_layers):
        layer_tensors = tensors(layer) if callable(tensors) else tensors
        layers.append(_ffn_layer(cfg, layer, layer_tensors, spec, fp8_experts, dtype))
    half = FFNHalf(cfg, spec, layers)
    choose_kernels(half)  # grouped GEMMs and the Triton kernels where the experts are on a GPU
    return half.eval().requires_grad_(False)


def _ffn_layer(
    cfg: ModelConfig,
    layer: int,
    tensors: Mapping[str, Tensor],
    spec: ShardSpec,
    fp8: bool,
    dtype: torch.dtype,
) -> nn.Module:
    p = f"{PREFIX}layers.{layer}."
    if not cfg.is_moe_layer(layer):
        return DenseFFN(_swiglu(p + "mlp.", tensors, spec, dtype))
    a, b = spec.range_of(cfg.moe_num_experts)
    names = [f"{p}moe.{n}_proj.weight" for n in ("gate", "up", "down")]
    gate, up, down = (tensors[name][a:b].contiguous() for name in names)
    share_expert = _swiglu(p + "share_expert.", tensors, spec, dtype)
    if gate.dtype == FP8_DTYPE:  # kept as stored (`fp8_weights_on`): the block-scaled GEMMs
        scales = [tensors[name + SCALE_SUFFIX][a:b] for name in names]
        if BlockFp8Experts.fits(gate, down):
            pairs = [t for pair in zip((gate, up, down), scales, strict=True) for t in pair]
            stacked = BlockFp8Experts.stack(*pairs)
            return MoEFFN(share_expert, BlockFp8RoutedExperts(stacked, a, cfg.moe_num_experts))
        # Widths the kernel does not take (not whole 128-wide blocks): widen, then as below.
        gate, up, down = (
            dequantize_block_fp8(w, s, DEFAULT_BLOCK, dtype)
            for w, s in zip((gate, up, down), scales, strict=True)
        )
    experts = Fp8RoutedExperts(Fp8Experts.quantize(gate, up, down), a) if fp8 else None
    return MoEFFN(share_expert, experts or RoutedExperts(gate, up, down, a))


def _swiglu(
    prefix: str, tensors: Mapping[str, Tensor], spec: ShardSpec, dtype: torch.dtype
) -> SwiGLU:
    """The shard's columns of an MLP: gate/up rows [a, b), down columns [a, b)."""
    a, b = spec.mlp_range(tensors[prefix + "gate_proj.weight"].shape[0])
    return SwiGLU(
        _linear(tensors, prefix + "gate_proj.weight", 0, a, b, dtype),
        _linear(tensors, prefix + "up_proj.weight", 0, a, b, dtype),
        _linear(tensors, prefix + "down_proj.weight", 1, a, b, dtype),
    )


def _linear(
    tensors: Mapping[str, Tensor], name: str, dim: int, a: int, b: int, dtype: torch.dtype
) -> nn.Module:
    """Indices [a, b) of `name` along `dim` as a linear layer: FP8 where the weight is, the
    cut falls on its 128-wide blocks and the inputs make whole 1 x 128 activation groups;
    else wide (such an FP8 weight is dequantised)."""
    weight = tensors[name]
    if weight.dtype != FP8_DTYPE:
        return _wide_linear(weight.narrow(dim, a, b - a).contiguous())
    scale = tensors[name + SCALE_SUFFIX]
    block, size = DEFAULT_BLOCK[dim], weight.shape[dim]
    on_blocks = a % block == 0 and (b % block == 0 or b == size)
    if on_blocks and (dim == 0 or (b - a) % GROUP == 0):  # whole 1 x 128 activation groups
        q = weight.narrow(dim, a, b - a).contiguous()
        s = scale.narrow(dim, a // block, -(-b // block) - a // block).contiguous()
        return _fp8_linear(q, s)
    wide = dequantize_block_fp8(weight, scale, DEFAULT_BLOCK, dtype)
    return _wide_linear(wide.narrow(dim, a, b - a).contiguous())


def _wide_linear(weight: Tensor) -> nn.Linear:
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


_device_scaling = functools.cache(pick_scaling)  # one probe GEMM per device, not per weight


def _fp8_linear(weight: Tensor, scale_inv: Tensor) -> Fp8Linear:
    scaling = _device_scaling(weight.device)
    if scaling == "blockwise" and weight.shape[1] % 512:
        scaling = "rowwise"  # cuBLASLt's block-scale grid needs rows of 4 blocks
    return Fp8Linear.from_block_fp8(weight, scale_inv, scaling)


def build_model(
    cfg: ModelConfig, tensors: Mapping[str, Tensor], fp8_experts: bool = False
) -> Step3ForCausalLM:
    """The whole model from every checkpoint tensor (already in dtype and on device)."""
    attention = {n: t for n, t in tensors.items() if not is_ffn_tensor(n)}
    ffn = {n: t for n, t in tensors.items() if is_ffn_tensor(n)}
    dtype = tensors["lm_head.weight"].dtype
    return Step3ForCausalLM(
        build_attention_half(cfg, attention),
        build_ffn_half(cfg, ffn, fp8_experts=fp8_experts, dtype=dtype),
    )


def load_model(
    checkpoint_dir: str | Path, dtype: str = "auto", device: str = "cpu", progress: bool = True
) -> Step3ForCausalLM:
    """The whole model from a checkpoint folder, FP8 where `fp8_weights_on(device)` says."""
    cfg = load_config(checkpoint_dir)
    checkpoint = Checkpoint(checkpoint_dir, cfg)
    tensors = checkpoint.load(
        dtype=resolve_dtype(dtype, cfg), device=device, progress=progress,
        keep_fp8=fp8_weights_on(device),
    )  # fmt: skip
    return build_model(cfg, tensors, fp8_experts_for(checkpoint, device))
