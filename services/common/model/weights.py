"""Load the text model's weights from a safetensors checkpoint folder.

Three steps, in this order, so that a bad checkpoint fails in seconds instead of after reading
hundreds of gigabytes: find the files (`model.safetensors`, or the shards an
`model.safetensors.index.json` lists, or any `*.safetensors`); read only their headers and check
every name and shape against `checkpoint_tensors(cfg)`, reporting all problems at once; then read
the requested tensors one by one, dequantising block FP8 and converting to the serving dtype.

Names. The released Step-3 checkpoint (`step3_vl`) keeps the text model at the top level
(`model.layers.N...`, `lm_head.weight`) beside the vision tower (`vision_model.*`,
`vit_downsampler*.*`, `vit_large_projector.*`): vLLM's `Step3VLForConditionalGeneration` maps
`model.` -> `language_model.model.` on its own side, and SGLang loads the names unchanged. Two
nested layouts are accepted too: vLLM's module names (`language_model.model.*`,
`language_model.lm_head.*`) and the transformers >= 4.52 VL layout (`model.language_model.*`).
Tensors outside the text model are ignored.

This module knows nothing of parallelism: callers pick their shard with `names`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from services.common.config import ModelConfig
from services.common.kernels.fp8 import DEFAULT_BLOCK, dequantize_block_fp8, scale_shape
from services.common.model.schema import Shape, checkpoint_tensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
MAX_PROBLEMS_SHOWN = 10

# Each layout: (checkpoint prefix, text-model prefix) pairs. The first is the released one.
LAYOUTS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("model.", "model."), ("lm_head.", "lm_head.")),
    (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
    (("model.language_model.", "model."), ("lm_head.", "lm_head.")),
)
Layout = tuple[tuple[str, str], ...]


class CheckpointError(ValueError):
    """The checkpoint folder is missing files or tensors, or does not fit the config."""


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lives: its file, its name in that file, and its header facts."""

    file: Path
    key: str
    shape: Shape
    dtype: str  # safetensors spelling: "BF16", "F32", "F8_E4M3", ...

    @property
    def is_fp8(self) -> bool:
        return self.dtype.startswith("F8_")


def load_weights(
    checkpoint_dir: str | Path,
    cfg: ModelConfig,
    *,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    names: Collection[str] | None = None,
    progress: bool = True,
    keep_fp8: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Read the text model's tensors, named as in `checkpoint_tensors(cfg)`: `Checkpoint`'s
    `load`, for a caller that reads once."""
    return Checkpoint(checkpoint_dir, cfg).load(
        dtype=dtype, device=device, names=names, progress=progress, keep_fp8=keep_fp8
    )


class Checkpoint:
    """A checkpoint folder whose headers were read and checked against the config once: its
    tensors can then be read in as many parts as a caller wants (an FFN instance reads its
    share layer by layer) without reading and checking the headers again."""

    def __init__(self, checkpoint_dir: str | Path, cfg: ModelConfig) -> None:
        root = Path(checkpoint_dir)
        self.schema = checkpoint_tensors(cfg)
        entries = _read_headers(*_find_files(root))
        self._tensors, self._scales = _text_tensors(entries, _choose_layout(entries, self.schema))
        has_fp8 = any(entry.is_fp8 for entry in self._tensors.values())
        self._block = _block_size(root) if has_fp8 else DEFAULT_BLOCK
        _validate(root, self._tensors, self._scales, self.schema, self._block)

    @property
    def fp8_names(self) -> set[str]:
        """The text model's tensors stored in FP8."""
        return {name for name, entry in self._tensors.items() if entry.is_fp8}

    def load(
        self,
        *,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        names: Collection[str] | None = None,
        progress: bool = True,
        keep_fp8: Callable[[str], bool] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every tensor comes back in `dtype` on `device` (block FP8 is dequantised). `names`
        picks a subset (default: all). A block-FP8 weight (128 x 128 blocks) whose name
        `keep_fp8` accepts comes back as stored instead, e4m3, with its float32 scales beside
        it as `NAME_scale_inv`, for an FP8 GEMM to use as they are."""
        schema, tensors, scales, block = self.schema, self._tensors, self._scales, self._block
        chosen = set(schema if names is None else names)
        wanted = [name for name in schema if name in chosen]
        unknown = sorted(chosen - set(schema))
        if unknown:
            raise ValueError(f"names not in the model: {', '.join(unknown[:MAX_PROBLEMS_SHOWN])}")

        loaded: dict[str, torch.Tensor] = {}
        with ExitStack() as stack:
            handles: dict[Path, Any] = {}

            def read(entry: _Entry) -> torch.Tensor:
                if entry.file not in handles:
                    handles[entry.file] = stack.enter_context(safe_open(entry.file, framework="pt"))
                return handles[entry.file].get_tensor(entry.key)

            # Tensor by tensor: at most one tensor exists in two dtypes at any moment.
            for name in tqdm(wanted, desc="loading weights", unit="tensor", disable=not progress):
                entry = tensors[name]
                if entry.is_fp8:
                    q, scale_inv = read(entry).to(device), read(scales[name]).to(device)
                    if keep_fp8 is not None and keep_fp8(name) and block == DEFAULT_BLOCK:
                        loaded[name], loaded[name + SCALE_SUFFIX] = q, scale_inv.float()
                    else:
                        loaded[name] = dequantize_block_fp8(q, scale_inv, block, dtype)
                else:
                    loaded[name] = read(entry).to(device=device, dtype=dtype)
        return loaded


def stored_fp8(checkpoint_dir: str | Path, cfg: ModelConfig) -> set[str]:
    """The text model's tensors that the checkpoint stores in FP8 (from the headers alone)."""
    entries = _read_headers(*_find_files(Path(checkpoint_dir)))
    tensors, _ = _text_tensors(entries, _choose_layout(entries, checkpoint_tensors(cfg)))
    return {name for name, entry in tensors.items() if entry.is_fp8}


def _find_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files to read and, for a sharded checkpoint, its name -> file map."""
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist")
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE], None
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a safetensors index ({err!r})") from err
        files = sorted(set(weight_map.values()))
        missing = [file for file in files if not (root / file).is_file()]
        if missing:
            raise CheckpointError(
                f"{index} lists {len(missing)} file(s) missing from {root}: {', '.join(missing)}"
            )
        return [root / file for file in files], weight_map
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in checkpoint folder {root}")
    return files, None


def _read_headers(files: list[Path], weight_map: dict[str, str] | None) -> dict[str, _Entry]:
    """Every tensor's location, shape and dtype, from the file headers alone."""
    entries: dict[str, _Entry] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if weight_map is not None and weight_map.get(key) != path.name:
                    continue  # the index is the authority on which copy counts
                if key in entries:
                    raise CheckpointError(
                        f"tensor {key} is stored twice: in {entries[key].file} and in {path}"
                    )
                view = f.get_slice(key)
                entries[key] = _Entry(path, key, tuple(view.get_shape()), view.get_dtype())
    if weight_map is not None:
        absent = [key for key in weight_map if key not in entries]
        if absent:
            raise CheckpointError(
                f"the index maps {len(absent)} tensor(s) to files that do not hold them, "
                f"e.g. {absent[0]} -> {weight_map[absent[0]]}"
            )
    return entries


def _text_name(key: str, layout: Layout) -> str | None:
    """The text model's name for checkpoint name `key`, or None if it is not a text tensor."""
    for ckpt_prefix, text_prefix in layout:
        if key.startswith(ckpt_prefix):
            return text_prefix + key[len(ckpt_prefix) :]
    return None


def _choose_layout(entries: dict[str, _Entry], schema: dict[str, Shape]) -> Layout:
    """The layout under which most of the model's tensors are found (ties: the released one)."""
    inverse = [{_text_name(key, layout) for key in entries} for layout in LAYOUTS]
    hits = [sum(name in found for name in schema) for found in inverse]
    return LAYOUTS[hits.index(max(hits))]


def _text_tensors(
    entries: dict[str, _Entry], layout: Layout
) -> tuple[dict[str, _Entry], dict[str, _Entry]]:
    """Split the text model's entries into tensors and FP8 scales, both keyed by text name.

    A scale is keyed by the name of the weight it scales (`x.weight_scale_inv` -> `x.weight`).
    """
    tensors: dict[str, _Entry] = {}
    scales: dict[str, _Entry] = {}
    for key, entry in entries.items():
        name = _text_name(key, layout)
        if name is None:
            continue  # vision tower, projector: not ours
        if name.endswith(SCALE_SUFFIX):
            scales[name.removesuffix(SCALE_SUFFIX)] = entry
        else:
            tensors[name] = entry
    return tensors, scales


def _validate(
    root: Path,
    tensors: dict[str, _Entry],
    scales: dict[str, _Entry],
    schema: dict[str, Shape],
    block: tuple[int, int],
) -> None:
    """Raise one CheckpointError listing every mismatch between the headers and the schema."""
    problems: list[str] = []
    for name, expected in schema.items():
        entry = tensors.get(name)
        if entry is None:
            problems.append(f"missing tensor {name} (expected shape {list(expected)})")
            continue
        if entry.shape != expected:
            problems.append(
                f"tensor {entry.key} has shape {list(entry.shape)}, expected {list(expected)}"
            )
            continue
        if entry.is_fp8:
            problems += _fp8_problems(entry, scales.get(name), block)
    for name, entry in sorted(tensors.items()):
        if name not in schema:
            problems.append(f"unexpected tensor {entry.key} with shape {list(entry.shape)}")
    for name, entry in sorted(scales.items()):
        if name not in tensors:
            problems.append(f"unexpected scale {entry.key} with shape {list(entry.shape)}")
    if problems:
        shown = "\n  ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = len(problems) - MAX_PROBLEMS_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise CheckpointError(
            f"checkpoint {root} does not fit the model config: {len(problems)} problem(s)"
            f"\n  {shown}{tail}"
        )


def _fp8_problems(entry: _Entry, scale: _Entry | None, block: tuple[int, int]) -> list[str]:
    if scale is None:
        return [f"fp8 tensor {entry.key} ({entry.dtype}) has no {entry.key}{SCALE_SUFFIX}"]
    if len(entry.shape) < 2:
        return [f"fp8 tensor {entry.key} has shape {list(entry.shape)}; block FP8 needs 2 dims"]
    expected = scale_shape(entry.shape, block)
    if scale.shape != expected:
        return [
            f"scale {scale.key} has shape {list(scale.shape)}, expected {list(expected)} "
            f"for weight shape {list(entry.shape)} and block {list(block)}"
        ]
    return []


def _block_size(root: Path) -> tuple[int, int]:
    """`quantization_config.weight_block_size` from config.json (top level or text_config)."""
    path = root / "config.json"
    if not path.is_file():
        return DEFAULT_BLOCK
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    quant = raw.get("quantization_config") or (raw.get("text_config") or {}).get(
        "quantization_config"
    )
    block = (quant or {}).get("weight_block_size")
    if block is None:
        return DEFAULT_BLOCK
    if (
        not isinstance(block, list)
        or len(block) != 2
        or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in block)
    ):
        raise CheckpointError(
            f"config field 'quantization_config.weight_block_size' must be two positive "
            f"integers, got {block!r}"
        )
    return block[0], block[1]
