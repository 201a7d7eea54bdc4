"""Write a random checkpoint with exactly the released layout, for tests and benchmarks.

Every tensor of `checkpoint_tensors(cfg)` is written as HF safetensors (one `model.safetensors`,
or numbered shards plus `model.safetensors.index.json`), optionally as DeepSeek-V3 block FP8.
Values depend only on the seed and the tensor's name, never on the shard layout, and shards are
generated and written one at a time, so a full-size Step-3 checkpoint needs about one shard of
RAM. This module writes no config.json; `fp8_quantization_config()` is what belongs in it.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from services.common.config import ModelConfig
from services.common.kernels.fp8 import DEFAULT_BLOCK, FP8_DTYPE, quantize_block_fp8, scale_shape
from services.common.model.schema import Shape, checkpoint_tensors, is_norm
from services.common.model.weights import INDEX_FILE, SCALE_SUFFIX, SINGLE_FILE

EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
ROUTER_SUFFIX = "moe.gate.weight"
_CHUNK_ELEMENTS = 2**24  # random numbers are drawn in float32 chunks of this size


def fp8_quantization_config(block: tuple[int, int] = DEFAULT_BLOCK) -> dict[str, Any]:
    """The `quantization_config` entry of config.json for a block FP8 checkpoint (DeepSeek-V3)."""
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }


def is_fp8_weight(name: str, shape: Shape) -> bool:
    """Matrices (stacked or not) are FP8; norms, the router, embedding and LM head stay wide."""
    return (
        len(shape) in (2, 3)
        and not is_norm(name)
        and name not in (EMBEDDING, LM_HEAD)
        and not name.endswith(ROUTER_SUFFIX)
    )


def write_random_weights(
    checkpoint_dir: Path,
    cfg: ModelConfig,
    *,
    dtype: torch.dtype,
    seed: int = 0,
    fp8: bool = False,
    max_shard_bytes: int = 2**31,
    name_prefix: str = "",
    progress: bool = True,
) -> None:
    """Write random weights for every schema tensor into `checkpoint_dir`.

    Norms are ones; other tensors are N(0, 1/fan_in) with fan_in the last dim, the embedding
    N(0, 1). With `fp8`, matrices are stored as float8_e4m3fn + float32 `_scale_inv` (128x128
    blocks). `name_prefix` is prepended to every name. Weight files written earlier into the
    folder are replaced.
    """
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    for old in [root / SINGLE_FILE, root / INDEX_FILE, *root.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)  # a stale file would shadow or mix with the new layout

    schema = checkpoint_tensors(cfg)
    sizes = {name: _stored_bytes(name, shape, dtype, fp8) for name, shape in schema.items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    files = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )

    weight_map: dict[str, str] = {}
    with tqdm(
        total=len(schema), desc="writing weights", unit="tensor", disable=not progress
    ) as bar:
        for shard, file in zip(shards, files, strict=True):
            tensors: dict[str, torch.Tensor] = {}
            for name in shard:
                w = random_tensor(name, schema[name], dtype, seed)
                if fp8 and is_fp8_weight(name, schema[name]):
                    w, scale_inv = _quantize(w)
                    tensors[name_prefix + name + SCALE_SUFFIX] = scale_inv
                tensors[name_prefix + name] = w
                bar.update()
            save_file(tensors, root / file, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(tensors, file)
            del tensors  # free this shard before generating the next
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def random_tensor(name: str, shape: Shape, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The (unquantised) value `write_random_weights` stores for tensor `name`, in `dtype`."""
    if is_norm(name):
        return torch.ones(shape, dtype=dtype)
    std = 1.0 if name == EMBEDDING else 1.0 / math.sqrt(shape[-1])
    generator = torch.Generator().manual_seed(_tensor_seed(seed, name))
    out = torch.empty(shape, dtype=dtype)
    rows = out.view(-1, shape[-1])  # [R, fan_in]
    # Fixed-size float32 chunks bound the temporary memory; the chunking is part of the
    # definition of the values, so it must never depend on the shard layout.
    step = max(1, _CHUNK_ELEMENTS // shape[-1])
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step]
        chunk.copy_(torch.randn(chunk.shape, generator=generator) * std)
    return out


def _tensor_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed per (seed, name); Python's hash() is salted per process."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 of w [E?, M, N], one matrix at a time so float32 temporaries stay small."""
    if w.dim() == 2:
        return quantize_block_fp8(w, DEFAULT_BLOCK)
    q = torch.empty(w.shape, dtype=FP8_DTYPE)
    scale_inv = torch.empty(scale_shape(tuple(w.shape), DEFAULT_BLOCK), dtype=torch.float32)
    for expert in range(w.shape[0]):
        q[expert], scale_inv[expert] = quantize_block_fp8(w[expert], DEFAULT_BLOCK)
    return q, scale_inv


def _stored_bytes(name: str, shape: Shape, dtype: torch.dtype, fp8: bool) -> int:
    """Bytes the tensor (and its scale, if FP8) takes in the file."""
    if fp8 and is_fp8_weight(name, shape):
        return math.prod(shape) + 4 * math.prod(scale_shape(shape, DEFAULT_BLOCK))
    return math.prod(shape) * dtype.itemsize


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, in schema order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards
