"""Model construction: a `Step3ForCausalLM` from a checkpoint folder, in the dtype asked for.

The module is built on the meta device and the loaded tensors are assigned in place, so no
weight is ever held twice.
"""

from __future__ import annotations

from pathlib import Path

import torch

from services.common.config import ModelConfig, load_config
from services.common.model.step3 import Step3ForCausalLM
from services.common.model.weights import load_weights

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
    with torch.device("meta"):
        model = Step3ForCausalLM(cfg)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def build_partial_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> Step3ForCausalLM:
    """A model holding only `tensors`; the rest stays on the meta device, taking no memory.

    Each side of AFD builds the same module tree and uses only the parts it holds.
    """
    with torch.device("meta"):
        model = Step3ForCausalLM(cfg)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"tensors the model does not have: {result.unexpected_keys[:5]}")
    return model.eval().requires_grad_(False)


def load_model(
    checkpoint_dir: str | Path, dtype: str = "auto", device: str = "cpu", progress: bool = True
) -> Step3ForCausalLM:
    cfg = load_config(checkpoint_dir)
    torch_dtype = resolve_dtype(dtype, cfg)
    tensors = load_weights(checkpoint_dir, cfg, dtype=torch_dtype, device=device, progress=progress)
    return build_model(cfg, tensors)
