"""Model shapes from config.json files of each family, and the errors a user sees."""

import json

import pytest

from services.common.presets import step3_config
from services.planner.models import PRESETS, load_model, model_from_config


def write_config(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return str(tmp_path)


def test_step3_vl_checkpoint_config_equals_the_preset(tmp_path):
    # The released checkpoint's form: the LLM under text_config, as this project writes it.
    folder = write_config(tmp_path, step3_config().to_vl_config())
    from_checkpoint, preset = load_model(folder), load_model("step3")
    assert from_checkpoint.attention == preset.attention
    assert from_checkpoint.ffn == preset.ffn
    assert from_checkpoint.ffn.num_dense_layers == 5  # layers 0-3 and 60


def test_step3_without_moe_layers_enum_makes_every_layer_but_the_first_moe():
    raw = dict(PRESETS["step3"])
    del raw["moe_layers_enum"]
    assert model_from_config(raw, "x").ffn.num_dense_layers == 1


def test_qwen3_moe_sparse_step_and_dense_only_layers():
    raw = {**PRESETS["qwen3-235b-a22b"], "decoder_sparse_step": 2, "mlp_only_layers": [1]}
    ffn = model_from_config(raw, "x").ffn
    # Odd-numbered layers are MoE with step 2; layer 1 is forced dense: 46 of 94 stay MoE.
    assert (ffn.num_moe_layers, ffn.num_dense_layers) == (46, 48)


def test_dense_gqa_model_has_no_moe_layers():
    model = load_model("qwen3-32b")
    assert not model.ffn.is_moe and model.ffn.sparsity == 1.0


def test_preset_names_ignore_case_and_separators():
    assert load_model("DeepSeek_V3").name == "deepseek-v3"
    assert load_model("Qwen3-235B-A22B").num_layers == 94


def test_kimi_k2_is_deepseek_v3_shaped_with_more_experts():
    kimi, dsv3 = load_model("kimi-k2"), load_model("deepseek-v3")
    assert kimi.attention.kind == "MLA" and kimi.attention.kv_elements == 576
    assert (kimi.ffn.num_experts, dsv3.ffn.num_experts) == (384, 256)
    assert kimi.ffn.sparsity < dsv3.ffn.sparsity


def test_unknown_model_lists_the_presets():
    with pytest.raises(ValueError) as err:
        load_model("llama-9000")
    assert "unknown model 'llama-9000'" in str(err.value)
    for name in PRESETS:
        assert name in str(err.value)


def test_missing_fields_are_all_named(tmp_path):
    raw = dict(PRESETS["deepseek-v3"])
    del raw["kv_lora_rank"], raw["v_head_dim"]
    with pytest.raises(ValueError, match="missing kv_lora_rank, v_head_dim"):
        load_model(write_config(tmp_path, raw))


def test_unsupported_model_type_names_the_supported_ones():
    with pytest.raises(ValueError, match="'model_type' is 'mamba'.*deepseek_v3"):
        model_from_config({"model_type": "mamba"}, "x")


def test_a_non_integer_field_is_named():
    raw = {**PRESETS["qwen3-32b"], "num_key_value_heads": "8"}
    with pytest.raises(ValueError, match="'num_key_value_heads' must be an integer"):
        model_from_config(raw, "x")


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_model(str(tmp_path))


def test_moe_layers_outside_the_model_are_refused():
    raw = {**PRESETS["step3"], "moe_layers_enum": "4,5,61"}
    with pytest.raises(ValueError, match="'moe_layers_enum' names layers outside 0..60"):
        model_from_config(raw, "x")


def test_a_folder_without_config_json_says_so(tmp_path):
    with pytest.raises(ValueError, match="no config.json in"):
        load_model(str(tmp_path))
