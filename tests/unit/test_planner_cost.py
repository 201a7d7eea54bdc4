"""Every published figure of the Step-3 paper's cost model (STEP3.md section 3), to its printed
precision, from the planner's presets and accelerators."""

import pytest

from services.planner.cost import cost_report, min_moe_sparsity, token_work
from services.planner.hardware import PAPER_ACCELERATORS, built_in
from services.planner.models import load_model

PAPER = [built_in()[name] for name in PAPER_ACCELERATORS]  # H800, H20, A800, 910B


def sig(value: float, digits: int = 3) -> float:
    """value rounded to `digits` significant figures, as the paper prints 2.56e8."""
    return float(f"{value:.{digits - 1}e}")


def test_step3_per_layer_quantities():
    model = load_model("step3")
    assert model.attention.kv_elements == 512  # 256 K + 256 V, one byte each in FP8
    assert model.attention.flops_per_context_token == 65_536  # 4 x 64 x 256
    assert model.attention.linear_params == 169_345_024
    assert token_work(model, 8192).arithmetic_intensity == 128


@pytest.mark.parametrize(
    "context, kv, attention, linear, ffn",
    [(8192, 2.56e8, 3.27e10, 2.07e10, 5.33e10), (32768, 1.02e9, 1.31e11, 2.07e10, 5.33e10)],
)
def test_step3_work_per_token(context, kv, attention, linear, ffn):
    work = token_work(load_model("step3"), context)
    assert sig(work.kv_bytes) == kv
    assert sig(work.attention_flops) == attention
    assert sig(work.linear_flops) == linear
    assert sig(work.ffn_flops) == ffn


@pytest.mark.parametrize(
    "context, attention_costs",
    [(8192, [0.048, 0.040, 0.040, 0.043]), (32768, [0.176, 0.114, 0.120, 0.133])],
)
def test_step3_attention_cost_per_accelerator(context, attention_costs):
    report = cost_report(load_model("step3"), context, PAPER)
    assert [round(c.attention_cost, 3) for c in report.per_accelerator] == attention_costs


def test_step3_ffn_cost_per_accelerator():
    report = cost_report(load_model("step3"), 8192, PAPER)
    assert [round(c.ffn_cost, 3) for c in report.per_accelerator] == [0.015, 0.040, 0.036, 0.035]


@pytest.mark.parametrize(
    "model, context, afd",
    [
        ("step3", 8192, 0.055),
        ("step3", 32768, 0.129),
        ("deepseek-v3", 8192, 0.068),
        ("deepseek-v3", 32768, 0.211),
        ("qwen3-235b-a22b", 8192, 0.062),
        ("qwen3-235b-a22b", 32768, 0.193),
    ],
)
def test_afd_cost_cheapest_attention_plus_cheapest_ffn(model, context, afd):
    assert round(cost_report(load_model(model), context, PAPER).afd_cost, 3) == afd


def test_step3_afd_puts_attention_on_h20_and_ffn_on_h800():
    report = cost_report(load_model("step3"), 8192, PAPER)
    assert (report.cheapest_attention.accelerator, report.cheapest_ffn.accelerator) == (
        "H20",
        "H800",
    )


def test_deepseek_v3_mla_quantities():
    model = load_model("deepseek-v3")
    assert model.attention.kind == "MLA"
    assert model.attention.kv_elements == 576
    assert model.attention.flops_per_context_token == 4 * 128 * 576
    assert model.num_layers == 61
    work = token_work(model, 8192)
    assert sig(work.linear_flops) == 2.28e10
    assert sig(work.ffn_flops) == 4.84e10


def test_qwen3_235b_gqa_quantities():
    model = load_model("qwen3-235b-a22b")
    attention = model.attention
    assert (attention.kind, model.num_layers) == ("GQA", 94)
    assert (attention.num_heads, attention.num_kv_heads, attention.head_dim) == (64, 4, 128)
    work = token_work(model, 8192)
    assert sig(work.linear_flops) == 1.34e10
    assert sig(work.ffn_flops) == 2.84e10


@pytest.mark.parametrize(
    "name, sparsity", [("H800", 0.058), ("H20", 0.007), ("A800", 0.031), ("910B", 0.034)]
)
def test_minimum_moe_sparsity_for_the_network(name, sparsity):
    assert round(min_moe_sparsity(load_model("step3"), built_in()[name]), 3) == sparsity


def test_bf16_kv_doubles_the_kv_bytes():
    model = load_model("step3")
    assert token_work(model, 8192, 2.0).kv_bytes == 2 * token_work(model, 8192).kv_bytes


def test_context_must_be_positive():
    with pytest.raises(ValueError, match="context"):
        token_work(load_model("step3"), 0)
