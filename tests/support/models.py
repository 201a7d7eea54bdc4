"""Small random-weight models built in memory, for tests of the model and the engine."""

from __future__ import annotations

import dataclasses

import torch

from services.common.activations import Layout
from services.common.config import ModelConfig
from services.common.model.build import build_model
from services.common.model.checkpoint_writer import random_tensor
from services.common.model.schema import checkpoint_tensors
from services.common.model.step3 import Step3ForCausalLM
from services.common.presets import tiny_config


def random_model(
    cfg: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu"
) -> Step3ForCausalLM:
    """The model `afd init-checkpoint` would write for `cfg` and `seed`, without the files,
    built on `device` (so that its layers take the kernels there, as a served model does)."""
    tensors = {
        name: random_tensor(name, shape, dtype, seed).to(device)
        for name, shape in checkpoint_tensors(cfg).items()
    }
    return build_model(cfg, tensors)


def small_config(**overrides) -> ModelConfig:
    """The tiny preset with a smaller vocabulary, for tests that do not need the tokenizer."""
    return dataclasses.replace(
        tiny_config(), **{"vocab_size": 512, "eos_token_ids": (511,), **overrides}
    )


def a2f_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, fp8: bool) -> int:
    """Bytes one token sends one FFN instance over all layers (activations, and its routing
    in MoE layers), as the wire layout packs them."""
    return sum(
        Layout(cfg.hidden_size, cfg.moe_top_k if cfg.is_moe_layer(i) else 0, dtype, fp8)
        .bytes_per_token
        for i in range(cfg.num_hidden_layers)
    )  # fmt: skip
