"""Model construction: a `Step3ForCausalLM` from a checkpoint folder, in the dtype asked for.

The module is built on the meta device and the loaded tensors are assigned in place, so no
weight is ever held twice. A weight the loader kept in block FP8 (`NAME_scale_inv` beside it)
replaces its `nn.Linear` with an `Fp8Linear` that multiplies it as stored; an attention
layer whose linears all became blockwise FP8 on a GPU runs as an `Fp8MFAAttention` (fused).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from services.common.config import ModelConfig, load_config
from services.common.model.fp8_attention import fuse_attention
from services.common.model.fp8_linear import Fp8Linear, pick_scaling
from services.common.model.schema import is_attention_linear
from services.common.model.step3 import Step3ForCausalLM
from services.common.model.weights import SCALE_SUFFIX, load_weights

DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def resolve_dtype(name: str, cfg: ModelConfig) -> torch.dtype:
    """`auto` is the checkpoint's own `torch_dtype`."""
    if name == "auto":
        name = cfg.torch_dtype
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def build_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> Step3ForCausalLM:
    """Assign `tensors` (every checkpoint tensor, already in dtype and on device)."""
    model, missing = _assign(cfg, tensors)
    if missing:
        raise ValueError(f"tensors missing for the model: {missing[:5]}")
    return model


def build_partial_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> Step3ForCausalLM:
    """A model holding only `tensors`; the rest stays on the meta device, taking no memory.

    Each side of AFD builds the same module tree and uses only the parts it holds.
    """
    return _assign(cfg, tensors)[0]


def _assign(
    cfg: ModelConfig, tensors: dict[str, torch.Tensor]
) -> tuple[Step3ForCausalLM, list[str]]:
    """The model with `tensors` in place, and the names of the parameters none was given for."""
    with torch.device("meta"):
        model = Step3ForCausalLM(cfg)
    fp8 = {n: t for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn}
    wide = {
        n: t for n, t in tensors.items() if n not in fp8 and n.removesuffix(SCALE_SUFFIX) not in fp8
    }
    result = model.load_state_dict(wide, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"tensors the model does not have: {result.unexpected_keys[:5]}")
    scalings: dict[torch.device, str] = {}
    for name, weight in fp8.items():
        scaling = scalings.setdefault(weight.device, pick_scaling(weight.device))
        if scaling == "blockwise" and weight.shape[1] % 512:
            scaling = "rowwise"  # cuBLASLt's block-scale grid needs rows of 4 blocks
        linear = Fp8Linear.from_block_fp8(weight, tensors[name + SCALE_SUFFIX], scaling)
        model.set_submodule(name.removesuffix(".weight"), linear)
    fuse_attention(model)  # layers whose linears are all blockwise FP8 on a GPU
    missing = [n for n in result.missing_keys if n not in fp8]
    return model.eval().requires_grad_(False), missing


def load_model(
    checkpoint_dir: str | Path,
    dtype: str = "auto",
    device: str = "cpu",
    progress: bool = True,
    keep_fp8: Callable[[str], bool] | None = None,
) -> Step3ForCausalLM:
    cfg = load_config(checkpoint_dir)
    torch_dtype = resolve_dtype(dtype, cfg)
    tensors = load_weights(
        checkpoint_dir, cfg, dtype=torch_dtype, device=device, progress=progress,
        keep_fp8=keep_fp8,
    )  # fmt: skip
    return build_model(cfg, tensors)


def fp8_linears_on(device: str | torch.device) -> Callable[[str], bool] | None:
    """Which block-FP8 weights to keep as FP8 on `device`: MFA's projections on a GPU (FP8
    GEMMs, half the bytes of bf16); none on a CPU, where plain matmuls want wide weights."""
    return is_attention_linear if torch.device(device).type == "cuda" else None
