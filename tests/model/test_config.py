"""config.json parsing: the released Step-3 VL file, the bare text form, round trips, every
error (each must name the field and the value) and the built-in presets."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from services.common.config import ConfigError, ModelConfig, load_config, parse_config
from services.common.presets import preset_config

# A replica of the released stepfun-ai/step3 config.json. The text fields and their values are
# STEP3.md section 1; the vision fields, `max_seq_len` and `image_token_id` are the defaults of
# vLLM's Step3VisionEncoderConfig / Step3TextConfig / Step3VLConfig. There is no `rms_norm_eps`.
RELEASED_MOE_LAYERS_ENUM = (
    "4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,"
    "32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59"
)
RELEASED_CONFIG: dict[str, Any] = {
    "architectures": ["Step3VLForConditionalGeneration"],
    "model_type": "step3_vl",
    "bos_token_id": 0,
    "eos_token_id": 128805,
    "image_token_id": 128001,
    "projector_bias": True,
    "understand_projector_stride": 1,
    "torch_dtype": "bfloat16",
    "vision_config": {
        "model_type": "step3_vision_encoder",
        "hidden_act": "quick_gelu",
        "hidden_size": 1792,
        "image_size": 728,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 63,
        "output_hidden_size": 4096,
        "patch_size": 14,
    },
    "text_config": {
        "architectures": ["Step3TextForCausalLM"],
        "model_type": "step3_text",
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "num_attention_heads": 64,
        "num_attention_groups": 1,
        "num_hidden_layers": 61,
        "max_seq_len": 65536,
        "vocab_size": 128815,
        "moe_intermediate_size": 5120,
        "moe_num_experts": 48,
        "moe_top_k": 3,
        "rope_theta": 500000,
        "rope_scaling": None,
        "max_position_embedding": 65536,
        "share_expert_dim": 5120,
        "share_q_dim": 2048,
        "head_dim": 256,
        "norm_expert_weight": False,
        "moe_layers_enum": RELEASED_MOE_LAYERS_ENUM,
        "torch_dtype": "bfloat16",
    },
}


def released() -> dict[str, Any]:
    return copy.deepcopy(RELEASED_CONFIG)


def bare_text_form() -> dict[str, Any]:
    """The same model as a bare step3_text config: token ids moved into the text fields."""
    raw = released()
    return {**raw["text_config"], "bos_token_id": 0, "eos_token_id": 128805}


def test_released_config_parses_to_step3() -> None:
    cfg = parse_config(released())
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (7168, 61, 128815)
    assert (cfg.num_attention_heads, cfg.num_attention_groups, cfg.head_dim) == (64, 1, 256)
    assert cfg.num_query_heads_per_group == 64
    assert (cfg.share_q_dim, cfg.intermediate_size) == (2048, 18432)
    assert (cfg.moe_num_experts, cfg.moe_top_k) == (48, 3)
    assert (cfg.moe_intermediate_size, cfg.share_expert_dim) == (5120, 5120)
    assert cfg.norm_expert_weight is False
    assert cfg.rope_theta == 500000.0
    assert cfg.max_position_embedding == 65536
    assert cfg.rms_norm_eps == 1e-5  # absent from the file: the default
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (0, (128805,))
    assert cfg.torch_dtype == "bfloat16"
    assert cfg.moe_layers == tuple(range(4, 60))
    dense = [layer for layer in range(61) if not cfg.is_moe_layer(layer)]
    assert dense == [0, 1, 2, 3, 60]


def test_bare_text_form_gives_the_same_config() -> None:
    assert parse_config(bare_text_form()) == parse_config(released())


def test_missing_moe_layers_enum_makes_every_layer_but_the_first_moe() -> None:
    raw = released()
    del raw["text_config"]["moe_layers_enum"]
    cfg = parse_config(raw)
    assert cfg.moe_layers == tuple(range(1, 61))
    assert not cfg.is_moe_layer(0) and cfg.is_moe_layer(60)


def test_eos_token_id_may_be_a_list() -> None:
    raw = released()
    raw["eos_token_id"] = [128805, 1]
    assert parse_config(raw).eos_token_ids == (128805, 1)


@pytest.mark.parametrize("form", ["to_vl_config", "to_text_config"])
@pytest.mark.parametrize("rms_norm_eps", [1e-5, 1e-6])
def test_round_trip_through_json(form: str, rms_norm_eps: float) -> None:
    cfg = replace(parse_config(released()), rms_norm_eps=rms_norm_eps)
    raw = json.loads(json.dumps(getattr(cfg, form)()))
    assert parse_config(raw) == cfg
    text = raw.get("text_config", raw)
    assert text["moe_layers_enum"] == RELEASED_MOE_LAYERS_ENUM
    # Like the released file, the default eps is left out and only a different one is written.
    assert ("rms_norm_eps" in text) == (rms_norm_eps != 1e-5)


def test_vl_form_is_the_released_layout() -> None:
    raw = parse_config(released()).to_vl_config()
    assert raw["model_type"] == "step3_vl"
    assert raw["text_config"]["model_type"] == "step3_text"
    assert (raw["bos_token_id"], raw["eos_token_id"]) == (0, [128805])
    assert "bos_token_id" not in raw["text_config"]


def test_load_config_reads_a_checkpoint_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(released(), indent=2))
    assert load_config(tmp_path) == parse_config(released())
    assert load_config(str(tmp_path)) == parse_config(released())


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change to the released config: `text.field` or `field` (top level) set to value."""

    def change(raw: dict[str, Any]) -> None:
        *parents, name = path.split(".")
        target = raw["text_config"] if parents == ["text"] else raw
        target[name] = value

    return change


def _delete(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda raw: raw["text_config"].pop(name)


def _set_dtype(value: str) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        raw["torch_dtype"] = raw["text_config"]["torch_dtype"] = value

    return change


BAD_CONFIGS = {
    "missing field": (_delete("hidden_size"), ["'hidden_size'", "missing"]),
    "int as string": (_set("text.hidden_size", "7168"), ["'hidden_size'", "'7168'"]),
    "bool for an int": (
        _set("text.num_attention_groups", True),
        ["'num_attention_groups'", "True"],
    ),
    "zero size": (_set("text.moe_intermediate_size", 0), ["'moe_intermediate_size'", "got 0"]),
    "moe layers as a list": (_set("text.moe_layers_enum", [4, 5]), ["'moe_layers_enum'", "[4, 5]"]),
    "moe layers not numbers": (_set("text.moe_layers_enum", "4,x"), ["'moe_layers_enum'", "'4,x'"]),
    "moe layer out of range": (
        _set("text.moe_layers_enum", "4,5,61"),
        ["'moe_layers_enum'", "61", "0..60"],
    ),
    "top-k above experts": (_set("text.moe_top_k", 49), ["'moe_top_k'", "49", "48"]),
    "groups do not divide heads": (
        _set("text.num_attention_groups", 3),
        ["'num_attention_groups'", "(3)", "(64)"],
    ),
    "unknown text model_type": (
        _set("text.model_type", "deepseek_v3"),
        ["'model_type'", "deepseek_v3"],
    ),
    "rope_scaling": (
        _set("text.rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
        ["'rope_scaling'", "yarn"],
    ),
    "unknown torch_dtype": (_set_dtype("float8_e4m3fn"), ["'torch_dtype'", "float8_e4m3fn"]),
    "text_config not an object": (
        _set("text_config", "step3_text"),
        ["'text_config'", "step3_text"],
    ),
    "eos outside the vocabulary": (_set("eos_token_id", 128815), ["128815", "vocabulary"]),
    "eos not an integer": (_set("eos_token_id", "</s>"), ["'eos_token_id'", "</s>"]),
    "norm_expert_weight not a bool": (
        _set("text.norm_expert_weight", "false"),
        ["'norm_expert_weight'", "'false'"],
    ),
    "rms_norm_eps zero": (_set("text.rms_norm_eps", 0), ["'rms_norm_eps'", "got 0.0"]),
    "empty moe layers": (_set("text.moe_layers_enum", " "), ["'moe_layers_enum'", "empty"]),
    "missing eos": (lambda raw: raw.pop("eos_token_id"), ["'eos_token_id'", "missing"]),
    "rope_parameters with yarn": (
        lambda raw: raw["text_config"].update(
            rope_theta=None, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}
        ),
        ["'rope_parameters'", "'yarn'"],
    ),
}


def test_top_level_token_ids_win_over_text_config_copies() -> None:
    raw = released()
    raw["text_config"]["eos_token_id"] = 1
    assert parse_config(raw).eos_token_ids == (128805,)


def test_rope_theta_may_come_from_rope_parameters() -> None:
    raw = released()
    del raw["text_config"]["rope_theta"]
    raw["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 250000.0}
    assert parse_config(raw).rope_theta == 250000.0


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_names_the_field_and_the_value(case: str) -> None:
    change, expected = BAD_CONFIGS[case]
    raw = released()
    change(raw)
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    for part in expected:
        assert part in str(err.value)


def test_unknown_bare_model_type_is_refused() -> None:
    raw = {**bare_text_form(), "model_type": "llama"}
    with pytest.raises(ConfigError, match="'model_type' is 'llama'"):
        parse_config(raw)


def test_config_must_be_an_object() -> None:
    with pytest.raises(ConfigError, match="must hold an object, got list"):
        parse_config([released()])  # type: ignore[arg-type]


def test_missing_config_json_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert "config.json" in str(err.value) and str(tmp_path) in str(err.value)


@pytest.mark.parametrize("content", [b'{"model_type": "step3_vl",', b'{"model_type": "\xff"}'])
def test_unreadable_config_json_names_the_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)
    assert "not valid JSON" in str(err.value)


def _dense_layers(cfg: ModelConfig) -> list[int]:
    return [layer for layer in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(layer)]


def test_tiny_preset_keeps_step3_structure() -> None:
    cfg = preset_config("tiny")
    last = cfg.num_hidden_layers - 1
    assert cfg.num_hidden_layers >= 3
    assert _dense_layers(cfg) == [0, last]
    assert cfg.moe_layers == tuple(range(1, last))
    assert cfg.num_attention_groups == 1
    assert cfg.share_q_dim < cfg.num_attention_heads * cfg.head_dim
    assert (cfg.moe_top_k, cfg.norm_expert_weight) == (3, False)
    assert cfg.moe_num_experts > cfg.moe_top_k
    assert cfg.vocab_size == 128815
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (0, (128805,))
    assert parse_config(json.loads(json.dumps(cfg.to_vl_config()))) == cfg


def test_full_step3_preset_is_the_released_config() -> None:
    assert preset_config("step3") == parse_config(released())


@pytest.mark.parametrize("num_layers", [5, 6, 12, 61])
def test_step3_preset_with_fewer_layers_keeps_the_dense_ends(num_layers: int) -> None:
    cfg = preset_config("step3", num_layers)
    assert cfg.num_hidden_layers == num_layers
    assert _dense_layers(cfg) == sorted({0, 1, 2, 3, num_layers - 1})
    assert cfg.moe_layers == tuple(range(4, num_layers - 1))
    assert replace(cfg, num_hidden_layers=61, moe_layers=()) == replace(
        preset_config("step3"), moe_layers=()
    )


def test_preset_errors() -> None:
    with pytest.raises(ValueError, match="--layers"):
        preset_config("tiny", 3)
    with pytest.raises(ValueError, match="'huge'"):
        preset_config("huge")
    with pytest.raises(ConfigError, match="'num_hidden_layers'.*0"):
        preset_config("step3", 0)
