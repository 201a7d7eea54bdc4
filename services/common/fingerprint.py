"""A model checkpoint's identity: a short hash of its config and its tensors' layout.

Attention and FFN instances must load the same model, or the activations they exchange mean
nothing; the controller refuses an instance whose fingerprint differs from the cluster's.
The hash covers config.json (as canonical JSON) and every tensor's name, dtype and shape, read
from the safetensors headers only: hashing the weights themselves would read hundreds of
gigabytes at every start. So two checkpoints that differ only in weight values (two
fine-tunes of one base) share a fingerprint; that is the price of a fast check.

Knows nothing of torch or of the model's architecture.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import safe_open

FINGERPRINT_CHARS = 16


def model_fingerprint(checkpoint_dir: str | Path) -> str:
    """16 hex characters identifying the checkpoint in `checkpoint_dir`."""
    root = Path(checkpoint_dir)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise ValueError(f"no config.json in checkpoint folder {root}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in checkpoint folder {root}")

    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    # Sorted by name, so how the tensors are split across files does not matter.
    for name, dtype, shape in sorted(_tensor_layout(files)):
        digest.update(f"\n{name} {dtype} {shape}".encode())
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def _tensor_layout(files: list[Path]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor, from the file headers alone."""
    layout = []
    for path in files:
        # The numpy framework reads headers without torch; no tensor data is touched.
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                view = f.get_slice(name)
                layout.append((name, view.get_dtype(), tuple(view.get_shape())))
    return layout
