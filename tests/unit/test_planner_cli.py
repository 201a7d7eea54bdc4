"""`afd plan cost|deploy` as a user runs it: the JSON keys scripts rely on, the Helm values the
chart takes, plots, and one-line errors for a user's mistakes."""

import json
import math

import pytest
import yaml

from services.cli import main
from services.common.presets import step3_config

PAPER_4K = ["plan", "deploy", "--model", "step3", "--context", "4K", "--gpu", "H800",
            "--gpus-per-instance", "8"]  # fmt: skip


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cost_json_keys_and_the_papers_figures(capsys):
    code, out, _ = run(capsys, "plan", "cost", "--model", "step3", "--context", "8K", "--json")
    assert code == 0
    result = json.loads(out)
    for key in ("kv_bytes", "attention_flops", "linear_flops", "ffn_flops", "attention_cost",
                "ffn_cost", "afd_cost", "attention_accelerator", "ffn_accelerator"):  # fmt: skip
        assert key in result
    assert result["context"] == 8192
    assert round(result["afd_cost"], 3) == 0.055
    assert (result["attention_accelerator"], result["ffn_accelerator"]) == ("H20", "H800")
    rows = {row["name"]: row for row in result["accelerators"]}
    assert list(rows) == ["H800", "H20", "A800", "910B"]
    assert round(rows["H800"]["attention_cost"], 3) == 0.048
    assert round(rows["H800"]["min_moe_sparsity"], 3) == 0.058


def test_cost_table_names_the_afd_split(capsys):
    code, out, _ = run(capsys, "plan", "cost", "--model", "step3", "--context", "32768")
    assert code == 0
    assert "AFD: attention on H20 (0.114) + FFN on H800 (0.015) = 0.129 USD per 1M tokens" in out


def test_cost_over_every_accelerator(capsys):
    _, out, _ = run(capsys, "plan", "cost", "--model", "kimi-k2", "--context", "8K",
                    "--hardware", "all", "--json")  # fmt: skip
    assert {row["name"] for row in json.loads(out)["accelerators"]} >= {"H200", "B200", "L40S"}


def test_deploy_json_keys(capsys):
    code, out, _ = run(capsys, *PAPER_4K, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["attention_instances"] == result["ffn_instances"] == 2
    assert (result["attention_gpus"], result["ffn_gpus"], result["micro_batches"]) == (16, 16, 3)
    assert result["tokens_per_gpu_s"] == pytest.approx(4039, rel=0.03)
    assert result["predicted_tpot_ms"] <= 50
    assert result["binding"] == "attention KV capacity"
    assert set(result["stage_us"]) == {"attention", "ffn", "a2f", "f2a"}
    assert result["stage_budget_us"] == pytest.approx(50_000 / 3 / 61)
    for key in ("ffn_layout", "batch_per_attention_gpu", "slowest_stage", "cost_per_1m_tokens"):
        assert key in result


def test_helm_values_have_exactly_the_charts_shape(capsys):
    code, out, _ = run(capsys, *PAPER_4K[:-2], "--format", "helm-values")
    assert code == 0
    comments = [line for line in out.splitlines() if line.startswith("#")]
    assert "step3" in comments[0] and "H800" in comments[0] and "tokens/GPU/s" in comments[1]
    gpu = {"resources": {"limits": {"nvidia.com/gpu": 1}}}
    code, plan_json, _ = run(capsys, *PAPER_4K[:-2], "--json")
    planned = json.loads(plan_json)
    batch = planned["batch_per_attention_gpu"]
    # batch sequences x 4096 tokens x 512 B (FP8 K and V) x 61 layers, in whole GiB
    kv_gib = math.ceil(batch * 4096 * 512 * 61 / 2**30)
    assert yaml.safe_load(out) == {
        "controller": {
            "microBatches": planned["micro_batches"],
            "ffnLayout": planned["ffn_layout"],
        },
        "attention": {
            "replicas": planned["attention_gpus"],
            "maxNumSeqs": batch,
            "maxModelLen": 4096,
            "kvCacheDtype": "fp8",
            "kvCacheGiB": kv_gib,
            **gpu,
        },
        "ffn": {"replicas": planned["ffn_gpus"], **gpu},
        "gateway": {"tpotSlaMs": 50},
    }


def test_helm_values_of_eight_gpu_instances_give_ffn_pods_of_eight_and_attention_pods_of_one(
    capsys,
):
    code, out, _ = run(capsys, *PAPER_4K, "--format", "helm-values")
    assert code == 0
    planned = json.loads(run(capsys, *PAPER_4K, "--json")[1])
    values = yaml.safe_load(out)
    assert values["controller"]["ffnLayout"] == "split"
    assert values["attention"]["replicas"] == planned["attention_gpus"] == 16
    assert values["attention"]["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert values["ffn"] == {
        "replicas": planned["ffn_instances"],
        "gpusPerInstance": 8,
        "resources": {"limits": {"nvidia.com/gpu": 8}},
    }


def test_the_serve_format_prints_the_plan_s_afd_serve_command(capsys):
    code, out, _ = run(capsys, *PAPER_4K, "--format", "serve")
    assert code == 0
    planned = json.loads(run(capsys, *PAPER_4K, "--json")[1])
    comment, command = out.splitlines()
    assert comment == "# CHECKPOINT: a folder holding a step3 checkpoint"
    assert command == (
        "afd serve --device cuda --model CHECKPOINT --attention-instances 16 --ffn-instances "
        f"2 --gpus-per-ffn-instance 8 --micro-batches {planned['micro_batches']} --ffn-layout "
        "split --kv-cache-dtype fp8"
    )


def test_instances_of_several_gpus_take_the_split_layout(capsys):
    code, _, err = run(capsys, *PAPER_4K, "--layout", "replicated")
    assert code == 2 and "--gpus-per-instance 8 takes --layout split" in err


def test_deploy_table_shows_the_plan_and_its_stages(capsys):
    code, out, _ = run(capsys, *PAPER_4K)
    assert code == 0
    assert "attention instances     2  (16 GPUs)" in out
    assert "binding" in out and "budget 273 us" in out


def test_plots_are_pngs(capsys, tmp_path):
    cost_png, stages_png = tmp_path / "cost.png", tmp_path / "stages.png"
    assert run(capsys, "plan", "cost", "--model", "step3", "--context", "8K",
               "--plot", str(cost_png))[0] == 0  # fmt: skip
    assert run(capsys, *PAPER_4K, "--plot", str(stages_png))[0] == 0
    for path in (cost_png, stages_png):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_plot_without_matplotlib_is_one_clear_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    code, _, err = run(capsys, *PAPER_4K, "--plot", str(tmp_path / "x.png"))
    assert code == 2
    assert err.strip() == (
        "afd plan: error: --plot needs matplotlib, which is not installed: pip install 'afd[bench]'"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "llama-9000"], "unknown model 'llama-9000'"),
        (["--gpu", "V100"], "unknown accelerator 'V100'; known: H800"),
        (["--tpot-ms", "1"], "no deployment of up to 256 H800 GPUs meets a 1 ms TPOT"),
        (["--micro-batches", "0"], "--micro-batches must be counts >= 1"),
    ],
)
def test_user_mistakes_end_in_one_line(capsys, argv, message):
    base = ["plan", "deploy", "--model", "step3", "--context", "4096"]
    code, out, err = run(capsys, *base, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("afd plan: error: ") and message in err


def test_a_checkpoint_missing_fields_is_named(capsys, tmp_path):
    raw = step3_config().to_vl_config()
    del raw["text_config"]["share_q_dim"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    code, _, err = run(capsys, "plan", "cost", "--model", str(tmp_path), "--context", "4K")
    assert code == 2 and "is missing share_q_dim" in err


def test_a_calibration_from_another_gpu_is_refused(capsys):
    code, _, err = run(capsys, *PAPER_4K, "--calibration",
                       "docs/results/planner/h200-step3-measured.json")  # fmt: skip
    assert code == 2
    assert "measured on H200, not H800: plan with --gpu H200" in err


def test_a_bad_context_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "cost", "--model", "step3", "--context", "lots"])
    assert exit_.value.code == 2
    assert "'lots' is not a token count like 8192 or 8K" in capsys.readouterr().err


def test_ffn_instances_of_eight_gpus_cut_an_attention_gpu_s_traffic_eightfold(capsys):
    # 16 attention and 16 FFN GPUs, as one-GPU instances and as the paper's 8-GPU ones.
    fixed = ["--attention-instances", "16", "--ffn-instances", "16", "--json"]
    one = json.loads(run(capsys, *PAPER_4K[:-2], *fixed)[1])
    fixed = ["--attention-instances", "2", "--ffn-instances", "2", "--json"]
    eight = json.loads(run(capsys, *PAPER_4K, *fixed)[1])
    assert one["ffn_gpus"] == eight["ffn_gpus"] == 16
    # Per FFN instance: the FP8 hidden state, its scale and 3 routes out; 7,168 bf16 back.
    per_instance = (7168 + 4 + 3 * 8) + 2 * 7168
    assert one["network_bytes_per_token_layer"] == 16 * per_instance  # 344 KB
    assert eight["network_bytes_per_token_layer"] == 2 * per_instance  # 43 KB: 1/8
