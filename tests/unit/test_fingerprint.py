"""The model fingerprint every member must share: config, tensor names, dtypes and shapes;
not how the files are split; read from the headers only."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from services.common.fingerprint import model_fingerprint

# ---- model fingerprint --------------------------------------------------------------------


def write_checkpoint(root, tensors, config=None, split=False):
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config or {"hidden_size": 8, "model": "x"}))
    if split:
        names = sorted(tensors)
        save_file({n: tensors[n] for n in names[:1]}, str(root / "model-1.safetensors"))
        save_file({n: tensors[n] for n in names[1:]}, str(root / "model-2.safetensors"))
    else:
        save_file(tensors, str(root / "model.safetensors"))
    return root


def test_fingerprint_covers_config_names_dtypes_and_shapes_not_file_split(tmp_path):
    tensors = {"a.weight": np.zeros((4, 8), np.float32), "b.bias": np.zeros(8, np.float16)}
    base = model_fingerprint(write_checkpoint(tmp_path / "base", tensors))
    assert len(base) == 16 and int(base, 16) >= 0
    assert model_fingerprint(write_checkpoint(tmp_path / "split", tensors, split=True)) == base
    reordered = {"hidden_size": 8, "model": "x"}  # same JSON, other key order
    assert model_fingerprint(write_checkpoint(tmp_path / "keys", tensors, reordered)) == base
    variants = {
        "config": ({**tensors}, {"hidden_size": 9, "model": "x"}),
        "shape": ({**tensors, "b.bias": np.zeros(9, np.float16)}, None),
        "dtype": ({**tensors, "b.bias": np.zeros(8, np.float32)}, None),
        "name": ({"a.weight": tensors["a.weight"], "c.bias": tensors["b.bias"]}, None),
    }
    for name, (variant, config) in variants.items():
        fingerprint = model_fingerprint(write_checkpoint(tmp_path / name, variant, config))
        assert fingerprint != base, name


def test_fingerprint_reads_headers_only(tmp_path):
    tensors = {"a.weight": np.ones((4, 8), np.float32)}
    root = write_checkpoint(tmp_path / "ckpt", tensors)
    before = model_fingerprint(root)
    path = root / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-8:] = b"\xff" * 8  # weights changed, header untouched
    path.write_bytes(bytes(data))
    assert model_fingerprint(root) == before


def test_fingerprint_needs_a_config_and_safetensors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        model_fingerprint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        model_fingerprint(tmp_path)
