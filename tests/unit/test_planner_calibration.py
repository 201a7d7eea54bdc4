"""Measured stage times in place of the paper's fits (`--calibration FILE`)."""

import json
from pathlib import Path

import pytest

from services.planner.calibration import fit, load_calibration
from services.planner.deploy import Request, evaluate, plan
from services.planner.hardware import built_in
from services.planner.models import load_model
from services.planner.stages import Cluster, Shape, attention_roofline

ROOT = Path(__file__).resolve().parents[2]
H200_EXAMPLE = ROOT / "docs/results/planner/h200-step3-measured.json"


def write(tmp_path, raw) -> Path:
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(raw))
    return path


def test_one_point_gives_an_efficiency_two_give_an_overhead_too():
    assert fit([(100e-6, 200e-6)], "ffn").efficiency == pytest.approx(0.5)
    line = fit([(100e-6, 250e-6), (300e-6, 650e-6)], "ffn")  # 50 us + roofline / 0.5
    assert (line.efficiency, line.overhead_s) == (pytest.approx(0.5), pytest.approx(50e-6))


def test_an_attention_point_is_set_against_the_planners_roofline(tmp_path):
    roofline = attention_roofline(load_model("step3"), built_in()["H200"], 128, 4096, 1.0)
    raw = {"gpu": "H200", "model": "step3", "attention": [{"micro_batch": 128, "context": 4096,
           "us": roofline * 1e6 / 0.25}]}  # fmt: skip
    calibration = load_calibration(write(tmp_path, raw), built_in())
    assert calibration.efficiency.attention.efficiency == pytest.approx(0.25)
    assert calibration.num_points == {"attention": 1, "ffn": 0, "network": 0}


def test_the_h200_example_reproduces_the_projection_it_came_from():
    # docs/benchmarks.md: 16A+16F, b = 128, transfers left out: TPOT 97.9 ms, 1961 tok/GPU/s.
    calibration = load_calibration(H200_EXAMPLE, built_in())
    cluster = Cluster(load_model("step3"), built_in()["H200"], 4096, network_gbps=1e7,
                      efficiency=calibration.efficiency)  # fmt: skip
    predicted = evaluate(Request(cluster, 0.050), Shape(16, 16, 128, 3))
    assert predicted.tpot_s == pytest.approx(0.0979, rel=0.05)
    assert predicted.tokens_per_gpu_s == pytest.approx(1961, rel=0.05)


def test_measured_stages_slower_than_the_papers_lower_the_plan():
    h200 = built_in()["H200"]
    calibration = load_calibration(H200_EXAMPLE, built_in())
    paper = plan(Request(Cluster(load_model("step3"), h200, 4096, 8), 0.050))
    measured = plan(
        Request(
            Cluster(load_model("step3"), h200, 4096, 8, efficiency=calibration.efficiency), 0.050
        )
    )
    assert measured.tokens_per_gpu_s < 0.5 * paper.tokens_per_gpu_s


def test_times_faster_than_the_datasheet_are_refused(tmp_path):
    raw = {"gpu": "H200", "model": "step3", "ffn": [{"tokens": 2048, "ffn_gpus": 16, "us": 1}]}
    with pytest.raises(ValueError, match="ffn times are .* faster than the datasheet roofline"):
        load_calibration(write(tmp_path, raw), built_in())


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model": "step3", "ffn": []}, "field 'gpu'"),
        ({"gpu": "H200", "model": "step3"}, "has no measurements"),
        ({"gpu": "V100", "model": "step3", "network": [{"bytes": 1, "us": 1}]},
         "unknown accelerator"),
        ({"gpu": "H200", "model": "step3", "attention": [{"context": 4096, "us": 400}]},
         r"attention\[0\] needs positive micro_batch"),
    ],
)  # fmt: skip
def test_bad_files_name_what_is_wrong(tmp_path, raw, message):
    with pytest.raises(ValueError, match=message):
        load_calibration(write(tmp_path, raw), built_in())
