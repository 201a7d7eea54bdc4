"""`afd plan` as a subprocess, the way a deploy script runs it: helm values it can pipe into
`helm install -f`, JSON it can parse, one line and exit code 2 for a mistake."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.chart import render

ROOT = Path(__file__).resolve().parents[2]


def afd(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_helm_values_from_a_subprocess_load_as_the_charts_values():
    result = afd("plan", "deploy", "--model", "step3", "--context", "8K", "--gpu", "H200",
                 "--format", "helm-values")  # fmt: skip
    assert result.returncode == 0, result.stderr
    values = yaml.safe_load(result.stdout)
    assert set(values) == {"controller", "attention", "ffn", "gateway"}
    assert values["attention"]["maxModelLen"] == 8192
    assert values["controller"]["ffnLayout"] in ("split", "replicated")


def test_json_from_a_subprocess_parses():
    result = afd("plan", "cost", "--model", "qwen3-235b-a22b", "--context", "32K", "--json")
    assert result.returncode == 0, result.stderr
    assert round(json.loads(result.stdout)["afd_cost"], 3) == 0.193


def test_a_mistake_is_one_line_and_exit_code_2():
    result = afd("plan", "deploy", "--model", "step3", "--context", "4K", "--gpu", "TPU")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "afd plan: error: unknown accelerator 'TPU'; known: H800, H20, A800, 910B, H100, H200, "
        "B200, L20, L40S (add one with --hardware-file)"
    ]


def test_helm_values_validate_against_the_charts_schema():
    # What `helm install -f plan.yaml` checks: the chart's defaults with the plan laid over
    # them must satisfy values.schema.json.
    jsonschema = pytest.importorskip("jsonschema")
    chart = ROOT / "deploy" / "helm" / "afd"
    if not (chart / "values.schema.json").is_file():
        pytest.skip("the Helm chart is not in this tree")
    result = afd("plan", "deploy", "--model", "step3", "--context", "4K", "--gpu", "H800",
                 "--tpot-ms", "37.5", "--format", "helm-values")  # fmt: skip
    assert result.returncode == 0, result.stderr
    values = merge(
        yaml.safe_load((chart / "values.yaml").read_text()), yaml.safe_load(result.stdout)
    )
    jsonschema.validate(values, json.loads((chart / "values.schema.json").read_text()))
    assert values["gateway"]["tpotSlaMs"] == 37.5


def merge(base: dict, override: dict) -> dict:
    """Helm's rule: maps merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = merge(base[key], value)
        else:
            merged[key] = value
    return merged


def test_helm_values_of_eight_gpu_instances_render_ffn_pods_of_eight_processes():
    # `afd plan deploy --gpus-per-instance 8 --format helm-values | helm template -f -`.
    result = afd("plan", "deploy", "--model", "step3", "--context", "8K", "--gpu", "H200",
                 "--gpus-per-instance", "8", "--format", "helm-values")  # fmt: skip
    assert result.returncode == 0, result.stderr
    rendered = render(yaml.safe_load(result.stdout))
    ffn, attention = rendered.container("ffn"), rendered.container("attention")
    assert ffn["args"][:2] == ["ffn-pod", "--processes=8"]
    assert ffn["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert attention["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--gpus-per-ffn-instance=8" in rendered.container("controller")["args"]
    assert rendered.workload("attention")["spec"]["replicas"] == 16
    assert rendered.workload("ffn")["spec"]["replicas"] == 2
