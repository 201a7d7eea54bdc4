"""Checkpoint writing and loading: round trips, block FP8, name layouts and every error."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.config import ModelConfig
from services.common.kernels.fp8 import FP8_MAX, dequantize_block_fp8, quantize_block_fp8
from services.common.model import weights as weights_module
from services.common.model.build import build_model
from services.common.model.checkpoint_writer import (
    fp8_quantization_config,
    random_tensor,
    write_random_weights,
)
from services.common.model.fp8_linear import Fp8Linear
from services.common.model.reference import reference_logits
from services.common.model.schema import checkpoint_tensors, is_attention_linear, is_mlp_linear
from services.common.model.weights import CheckpointError, load_weights, stored_fp8
from services.common.presets import tiny_config

E4M3_HALF_ULP = 2**-4  # 3 mantissa bits: round-to-nearest is within 2^-4 of the value
VISION = {
    "vision_model.embeddings.patch_embedding.weight": torch.randn(8, 3, 2, 2),
    "vit_large_projector.weight": torch.randn(64, 16),
}


def small_config(**changes: object) -> ModelConfig:
    """tiny_config with a 1000-token vocabulary, so embedding and head are cheap."""
    return replace(tiny_config(), vocab_size=1000, eos_token_ids=(999,), **changes)


def write(path: Path, cfg: ModelConfig | None = None, **kwargs: object) -> Path:
    kwargs.setdefault("dtype", torch.bfloat16)
    write_random_weights(path, cfg or small_config(), progress=False, **kwargs)
    return path


def load(path: Path, cfg: ModelConfig | None = None, **kwargs: object) -> dict[str, torch.Tensor]:
    kwargs.setdefault("dtype", torch.bfloat16)
    return load_weights(path, cfg or small_config(), progress=False, **kwargs)


def stored(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor in every safetensors file of the folder, as written."""
    return {k: v for file in sorted(path.glob("*.safetensors")) for k, v in load_file(file).items()}


def rewrite(file: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def assert_equal_to_stored(loaded: dict[str, torch.Tensor], path: Path, prefix: str = "") -> None:
    files = stored(path)
    assert list(loaded) == list(checkpoint_tensors(small_config()))
    for name, tensor in loaded.items():
        written = files[prefix + name]
        assert tensor.dtype == written.dtype
        assert torch.equal(tensor, written), name


# ---- block FP8 math -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "block"),
    [((256, 256), (128, 128)), ((200, 300), (128, 128)), ((3, 200, 300), (128, 128)),
     ((1, 5), (128, 128)), ((2, 70, 50), (32, 16))],
)  # fmt: skip
def test_quantize_error_within_e4m3_precision(shape: tuple[int, ...], block: tuple[int, int]):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    q, scale_inv = quantize_block_fp8(w, block)
    *lead, m, n = shape
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale_inv.dtype == torch.float32
    assert scale_inv.shape == (*lead, math.ceil(m / block[0]), math.ceil(n / block[1]))
    back = dequantize_block_fp8(q, scale_inv, block, torch.float32)
    # The block amax maps to FP8_MAX: every element is within half an e4m3 ulp of its amax.
    amax = (scale_inv * FP8_MAX).repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)
    bound = E4M3_HALF_ULP * amax[..., :m, :n] * (1 + 1e-6)
    assert ((back - w).abs() <= bound).all()
    assert (back - w).abs().max() > 0  # it really was quantised


def test_quantize_guards_zero_blocks():
    w = torch.zeros(130, 260)
    w[129, 259] = 1.0  # only the last (partial) block is non-zero
    q, scale_inv = quantize_block_fp8(w)
    assert torch.isfinite(scale_inv).all() and torch.isfinite(q.float()).all()
    assert torch.equal(dequantize_block_fp8(q, scale_inv, (128, 128), torch.float32), w)


def test_dequantize_rejects_a_scale_of_the_wrong_shape():
    q, scale_inv = quantize_block_fp8(torch.randn(200, 300))
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        dequantize_block_fp8(q, scale_inv[:1], (128, 128), torch.float32)


# ---- round trips ----------------------------------------------------------------------------


def test_round_trip_single_file(tmp_path: Path):
    write(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert_equal_to_stored(load(tmp_path), tmp_path)


def test_round_trip_sharded(tmp_path: Path):
    write(tmp_path, max_shard_bytes=64 * 1024)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and shards[0].name.endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = stored(tmp_path)
    assert set(index["weight_map"]) == set(checkpoint_tensors(small_config())) == set(files)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in files.values())
    assert_equal_to_stored(load(tmp_path), tmp_path)


@pytest.mark.parametrize("prefix", ["", "language_model."])
def test_vl_layout_loads_text_and_ignores_vision(tmp_path: Path, prefix: str):
    write(tmp_path, name_prefix=prefix)
    rewrite(tmp_path / "model.safetensors", lambda tensors: tensors.update(VISION))
    assert_equal_to_stored(load(tmp_path), tmp_path, prefix)


def test_transformers_vl_layout(tmp_path: Path):
    """transformers >= 4.52 saves the VL text model as `model.language_model.*`."""
    write(tmp_path)

    def nest(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if k.startswith("model.")]:
            tensors["model.language_model." + key.removeprefix("model.")] = tensors.pop(key)
        tensors.update({"model." + k: v for k, v in VISION.items()})

    rewrite(tmp_path / "model.safetensors", nest)
    loaded = load(tmp_path)
    files = stored(tmp_path)
    assert torch.equal(loaded["model.norm.weight"], files["model.language_model.norm.weight"])
    assert torch.equal(loaded["lm_head.weight"], files["lm_head.weight"])


def test_names_loads_a_subset_in_the_requested_dtype(tmp_path: Path):
    write(tmp_path, max_shard_bytes=64 * 1024)
    names = ["lm_head.weight", "model.layers.2.moe.down_proj.weight"]
    loaded = load(tmp_path, names=names, dtype=torch.float32)
    assert sorted(loaded) == sorted(names)
    files = stored(tmp_path)
    for name in names:
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], files[name].float())
    with pytest.raises(ValueError, match="model.layers.9.mlp.up_proj.weight"):
        load(tmp_path, names=["model.layers.9.mlp.up_proj.weight"])


def test_same_seed_same_tensors_whatever_the_shards(tmp_path: Path):
    write(tmp_path / "one", seed=7)
    write(tmp_path / "many", seed=7, max_shard_bytes=32 * 1024)
    write(tmp_path / "other", seed=8)
    one, many, other = (load(tmp_path / d) for d in ("one", "many", "other"))
    assert all(torch.equal(one[name], many[name]) for name in one)
    assert not torch.equal(one["model.layers.0.self_attn.q_proj.weight"],
                           other["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    assert torch.equal(one["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    embed, o_proj = one["model.embed_tokens.weight"], one["model.layers.0.self_attn.o_proj.weight"]
    assert 0.9 < embed.float().std() < 1.1
    assert 0.9 < o_proj.float().std() * math.sqrt(o_proj.shape[-1]) < 1.1


def test_fp8_round_trip_is_close_to_the_unquantised_weights(tmp_path: Path):
    cfg = small_config()
    write(tmp_path, fp8=True, seed=3, max_shard_bytes=64 * 1024)
    files = stored(tmp_path)
    experts = "model.layers.1.moe.gate_proj.weight"
    assert files[experts].dtype == torch.float8_e4m3fn
    assert files[experts + "_scale_inv"].shape == (8, 1, 1)
    for wide in ("model.layers.1.moe.gate.weight", "model.norm.weight", "lm_head.weight"):
        assert files[wide].dtype == torch.bfloat16 and wide + "_scale_inv" not in files
    loaded = load(tmp_path, dtype=torch.float32)
    for name, shape in checkpoint_tensors(cfg).items():
        exact = random_tensor(name, shape, torch.bfloat16, seed=3).float()
        error = (loaded[name] - exact).abs().max()
        assert error <= E4M3_HALF_ULP * exact.abs().max() * (1 + 1e-6), name


def test_fp8_attention_linears_can_stay_fp8_with_their_scales(tmp_path: Path):
    write(tmp_path, fp8=True, seed=4)
    loaded = load(tmp_path, dtype=torch.float32, keep_fp8=is_attention_linear)
    files = stored(tmp_path)
    q_proj = "model.layers.2.self_attn.q_proj.weight"
    assert torch.equal(loaded[q_proj].view(torch.uint8), files[q_proj].view(torch.uint8))
    assert torch.equal(loaded[q_proj + "_scale_inv"], files[q_proj + "_scale_inv"])
    experts = "model.layers.1.moe.gate_proj.weight"  # FP8 too, but not asked to stay so
    assert loaded[experts].dtype == torch.float32 and experts + "_scale_inv" not in loaded


def test_a_model_with_fp8_linears_tracks_the_dequantised_one(tmp_path: Path):
    # Widths that are whole 128-blocks, as FP8 GEMMs need; on CPU they run the torch path.
    cfg = small_config(
        hidden_size=128, share_q_dim=128, num_attention_heads=4, head_dim=32,
        intermediate_size=256, share_expert_dim=128,
    )  # fmt: skip
    write(tmp_path, cfg, fp8=True, seed=5)
    keep = lambda name: is_attention_linear(name) or is_mlp_linear(name)  # noqa: E731
    fp8 = build_model(cfg, load(tmp_path, cfg, dtype=torch.float32, keep_fp8=keep))
    wide = build_model(cfg, load(tmp_path, cfg, dtype=torch.float32))
    moe = cfg.moe_layers[0]
    assert isinstance(fp8.attention.layers[3].self_attn.o_proj, Fp8Linear)
    assert isinstance(fp8.ffn.layers[0].mlp.down_proj, Fp8Linear)  # a dense layer's MLP
    assert isinstance(fp8.ffn.layers[moe].share_expert.gate_proj, Fp8Linear)
    assert isinstance(wide.attention.layers[3].self_attn.o_proj, torch.nn.Linear)
    assert isinstance(wide.ffn.layers[0].mlp.down_proj, torch.nn.Linear)
    prompt = list(range(3, 40, 3))
    a, b = reference_logits(fp8, prompt).float(), reference_logits(wide, prompt).float()
    # What is left is the activations' 1 x 128 e4m3 rounding (about 3% per value).
    assert ((a - b).norm() / b.norm()).item() < 0.1


def test_which_tensors_a_checkpoint_stores_in_fp8_is_read_from_the_headers(tmp_path: Path):
    fp8 = stored_fp8(write(tmp_path / "fp8", fp8=True), small_config())
    assert "model.layers.1.moe.gate_proj.weight" in fp8
    assert "model.layers.0.self_attn.q_proj.weight" in fp8
    assert not {"model.norm.weight", "lm_head.weight", "model.layers.1.moe.gate.weight"} & fp8
    assert stored_fp8(write(tmp_path / "wide"), small_config()) == set()


def test_fp8_block_size_comes_from_config_json(tmp_path: Path):
    block = (32, 16)
    write(tmp_path, fp8=True)

    def requantize(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if k.endswith("_scale_inv")]:
            name = key.removesuffix("_scale_inv")
            wide = dequantize_block_fp8(tensors[name], tensors[key], (128, 128), torch.float32)
            tensors[name], tensors[key] = quantize_block_fp8(wide, block)

    rewrite(tmp_path / "model.safetensors", requantize)
    with pytest.raises(CheckpointError, match=r"scale model\.layers\.\d+\..*_scale_inv has shape"):
        load(tmp_path)  # no config.json: 128x128 assumed, which these scales do not fit
    config = {**small_config().to_vl_config(), "quantization_config": fp8_quantization_config()}
    config["quantization_config"]["weight_block_size"] = list(block)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load(tmp_path, dtype=torch.float32)
    exact = random_tensor("model.layers.0.self_attn.wq.weight", (128, 48), torch.bfloat16, 0)
    assert (loaded["model.layers.0.self_attn.wq.weight"] - exact.float()).abs().max() < 0.05


# ---- errors ---------------------------------------------------------------------------------


def test_missing_and_misshaped_tensors_are_reported_together(tmp_path: Path):
    write(tmp_path, name_prefix="language_model.")

    def damage(tensors: dict[str, torch.Tensor]) -> None:
        del tensors["language_model.model.layers.0.self_attn.q_proj.weight"]
        tensors["language_model.model.layers.3.moe.up_proj.weight"] = torch.zeros(8, 16, 64)

    rewrite(tmp_path / "model.safetensors", damage)
    with pytest.raises(CheckpointError) as err:
        load(tmp_path)
    message = str(err.value)
    assert "2 problem(s)" in message
    assert "missing tensor model.layers.0.self_attn.q_proj.weight (expected shape [48, 64])" in (
        message
    )
    assert (
        "tensor language_model.model.layers.3.moe.up_proj.weight has shape [8, 16, 64], "
        "expected [8, 32, 64]" in message
    )


def test_unexpected_tensors_are_named_with_their_shapes_and_counted(tmp_path: Path):
    write(tmp_path, small_config(num_hidden_layers=6))  # layer 5: 11 tensors the model lacks
    with pytest.raises(CheckpointError) as err:
        load(tmp_path)
    message = str(err.value)
    assert "11 problem(s)" in message and "... and 1 more" in message
    assert "unexpected tensor model.layers.5.input_layernorm.weight with shape [64]" in message
    assert "unexpected tensor model.layers.5.mlp.down_proj.weight with shape [64, 128]" in message


def test_validation_reads_no_tensor_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    write(tmp_path, small_config(num_hidden_layers=6))
    real_safe_open, reads = weights_module.safe_open, []

    class Spy:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.inner = real_safe_open(*args, **kwargs)

        def __enter__(self) -> Spy:
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.__exit__(*exc)

        def get_tensor(self, key: str) -> torch.Tensor:
            reads.append(key)
            return self.inner.get_tensor(key)

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

    monkeypatch.setattr(weights_module, "safe_open", Spy)
    with pytest.raises(CheckpointError):
        load(tmp_path)
    assert reads == []


def test_fp8_tensor_without_scale(tmp_path: Path):
    write(tmp_path, fp8=True)
    name = "model.layers.4.mlp.down_proj.weight"
    rewrite(tmp_path / "model.safetensors", lambda tensors: tensors.pop(name + "_scale_inv"))
    with pytest.raises(CheckpointError, match=f"fp8 tensor {name} .* has no {name}_scale_inv"):
        load(tmp_path)


def test_no_safetensors_files(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=f"no \\*.safetensors files in .*{tmp_path.name}"):
        load(tmp_path)


def test_index_listing_a_missing_file(tmp_path: Path):
    write(tmp_path, max_shard_bytes=64 * 1024)
    lost = sorted(tmp_path.glob("model-*.safetensors"))[1]
    lost.unlink()
    with pytest.raises(CheckpointError, match=f"missing from .*: {lost.name}"):
        load(tmp_path)


def test_rewriting_a_folder_replaces_the_old_layout(tmp_path: Path):
    write(tmp_path, max_shard_bytes=64 * 1024, seed=1)
    write(tmp_path, seed=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
