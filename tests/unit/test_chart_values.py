"""The chart's values: values.schema.json refuses what would not work with a message that names
the key, the planner's values file installs as printed, and every optional object exists only
when it is enabled."""

from __future__ import annotations

import contextlib
import io
import json

import helm_python
import pytest
import yaml

from services.cli import main as afd
from services.common.cluster_config import LAYOUTS, MAX_MICRO_BATCHES, ClusterConfig
from tests.support.chart import CHART, CPU_SMALL, GPU_2A2F, render, schema_error

# What `afd plan deploy ... --format helm-values` prints: these keys and no others.
PLANNER_VALUES = """\
# afd plan deploy --model step3 --context 8192 --tpot-sla-ms 50 --format helm-values
controller:
  microBatches: 3
  ffnLayout: split
attention:
  replicas: 32
  maxNumSeqs: 96
  maxModelLen: 8192
  resources:
    limits:
      nvidia.com/gpu: 1
ffn:
  replicas: 16
  resources:
    limits:
      nvidia.com/gpu: 1
gateway:
  tpotSlaMs: 50
"""

REFUSED = [
    # (values, what the message must say)
    ({"attention": {"replicas": -1}}, "/attention/replicas': minimum: got -1, want 1"),
    ({"ffn": {"replicas": 0}}, "/ffn/replicas': minimum: got 0, want 1"),
    ({"attention": {"replicas": "two"}}, "/attention/replicas': got string, want integer"),
    (
        {"controller": {"ffnLayout": "sharded"}},
        "/controller/ffnLayout': value must be one of 'split', 'replicated'",
    ),
    # The cluster's facts are the controller's values only: no role takes them.
    ({"ffn": {"layout": "split"}}, "additional properties 'layout' not allowed"),
    ({"fp8Dispatch": True}, "additional properties 'fp8Dispatch' not allowed"),
    ({"controller": {"microBatches": 0}}, "/controller/microBatches': minimum: got 0, want 1"),
    ({"controller": {"microBatches": 5}}, "/controller/microBatches': maximum: got 5, want 4"),
    ({"controller": {"microBatches": 2.5}}, "/controller/microBatches': got number, want integer"),
    ({"controller": {"maxNumBatchedTokens": 0}}, "/controller/maxNumBatchedTokens': minimum"),
    ({"attention": {"maxNumSeqs": 0}}, "/attention/maxNumSeqs': minimum"),
    ({"attention": {"kvCacheDtype": "int4"}}, "/attention/kvCacheDtype': value must be one of"),
    ({"gateway": {"tpotSlaMs": 0}}, "/gateway/tpotSlaMs'"),
    ({"gateway": {"tpotSlaMs": "50ms"}}, "/gateway/tpotSlaMs': got string, want number"),
    # One attention or FFN instance is one process on one GPU: there is no "2 GPUs per pod".
    (
        {"attention": {"resources": {"limits": {"nvidia.com/gpu": 2}}}},
        "/attention/resources/limits/nvidia.com~1gpu': value must be one of 0, 1",
    ),
    (
        {"ffn": {"resources": {"limits": {"nvidia.com/gpu": -1}}}},
        "/ffn/resources/limits/nvidia.com~1gpu': minimum: got -1",
    ),
    (
        {"gateway": {"resources": {"limits": {"nvidia.com/gpu": 1}}}},
        "/gateway/resources/limits/nvidia.com~1gpu': value must be one of 0",
    ),
    # A misspelt key is an error, not a silently ignored setting.
    ({"atention": {"replicas": 4}}, "additional properties 'atention' not allowed"),
    ({"ffn": {"replica": 4}}, "additional properties 'replica' not allowed"),
    ({"model": {"source": "s3"}}, "/model/source': value must be one of 'pvc', 'hostPath', 'copy'"),
    ({"model": {"source": "hostPath"}}, "/model/hostPath/path': '' does not match pattern '^/'"),
    ({"model": {"source": "copy"}}, "/model/copy/source': minProperties"),
    ({"model": {"subPath": "../../etc"}}, "/model/subPath': '../../etc' does not match pattern"),
    ({"auth": {"apiKeys": ["two words"]}}, "/auth/apiKeys/0': 'two words' does not match"),
    ({"ffn": {"pdb": {"maxUnavailable": -1}}}, "/ffn/pdb/maxUnavailable'"),
    ({"prometheus": {"address": "prometheus:9090"}}, "/prometheus/address'"),
]


@pytest.mark.parametrize(("values", "message"), REFUSED, ids=[m for _, m in REFUSED])
def test_the_schema_refuses_wrong_values_naming_the_key(values, message):
    error = schema_error(values)
    assert error is not None, f"accepted {values}"
    assert message in error, error


def test_install_refuses_wrong_values_before_rendering_anything():
    with pytest.raises(helm_python.HelmValuesError, match="minimum: got -1, want 1"):
        render({"attention": {"replicas": -1}})


def test_the_chart_s_own_values_and_the_test_deployments_pass_the_schema():
    assert schema_error({}) is None
    assert schema_error(GPU_2A2F) is None
    assert schema_error(CPU_SMALL) is None


def test_autoscaling_bounds_must_be_ordered():
    with pytest.raises(helm_python.HelmError, match="minReplicas 8 is above maxReplicas 4"):
        render({"ffn": {"autoscaling": {"enabled": True, "minReplicas": 8, "maxReplicas": 4}}})


def test_the_chart_s_cluster_facts_default_and_range_as_the_controller_s():
    """values.yaml cannot import cluster_config.py: this keeps the two one fact."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())["controller"]
    defaults = ClusterConfig()
    assert (
        values["microBatches"],
        values["maxNumBatchedTokens"],
        values["fp8Dispatch"],
        values["ffnLayout"],
    ) == (
        defaults.num_micro_batches,
        defaults.max_num_batched_tokens,
        defaults.fp8_dispatch,
        defaults.ffn_layout,
    )
    schema = json.loads((CHART / "values.schema.json").read_text())
    facts = schema["properties"]["controller"]["properties"]
    assert facts["microBatches"]["maximum"] == MAX_MICRO_BATCHES
    assert tuple(facts["ffnLayout"]["enum"]) == LAYOUTS


def test_the_planner_s_values_file_installs_as_printed():
    values = yaml.safe_load(PLANNER_VALUES)
    rendered = render(values)
    attention, ffn = rendered.workload("attention"), rendered.workload("ffn")
    assert attention["spec"]["replicas"] == 32 and ffn["spec"]["replicas"] == 16
    args = rendered.container("attention")["args"]
    assert "--max-num-seqs=96" in args and "--max-model-len=8192" in args
    assert "--device=cuda" in args
    assert rendered.container("attention")["resources"]["limits"]["nvidia.com/gpu"] == 1
    controller = rendered.container("controller")["args"]
    assert "--micro-batches=3" in controller and "--ffn-layout=split" in controller
    assert "--tpot-sla-ms=50" in rendered.container("gateway")["args"]


@pytest.mark.parametrize("context", ["4K", "32K"])
def test_what_afd_plan_deploy_prints_installs(context):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        command = ["plan", "deploy", "--model", "step3", "--context", context, "--tpot-ms", "50"]
        assert afd([*command, "--gpu", "H800", "--format", "helm-values"]) == 0
    plan = yaml.safe_load(stdout.getvalue())
    rendered = render(plan)
    for role in ("attention", "ffn"):
        assert rendered.workload(role)["spec"]["replicas"] == plan[role]["replicas"], role
        assert "--device=cuda" in rendered.container(role)["args"], role
    assert (
        f"--max-model-len={plan['attention']['maxModelLen']}"
        in rendered.container("attention")["args"]
    )


def test_the_planner_s_keys_are_documented_in_values_yaml():
    documented = yaml.safe_load((CHART / "values.yaml").read_text())
    for role, keys in yaml.safe_load(PLANNER_VALUES).items():
        for key in keys:
            assert key in documented[role], f"{role}.{key}"


OPTIONAL = {
    # values that enable it -> (kind, how many)
    "gateway.ingress": ({"gateway": {"ingress": {"enabled": True}}}, "Ingress", 1),
    "metrics.serviceMonitor": (
        {"metrics": {"serviceMonitor": {"enabled": True}}},
        "ServiceMonitor",
        1,
    ),
    "metrics.prometheusRule": (
        {"metrics": {"prometheusRule": {"enabled": True}}},
        "PrometheusRule",
        1,
    ),
    "metrics.dashboards": ({"metrics": {"dashboards": {"enabled": True}}}, "ConfigMap", 3),
    "attention.autoscaling": (
        {"attention": {"autoscaling": {"enabled": True}}},
        "ScaledObject",
        1,
    ),
    "ffn.autoscaling": ({"ffn": {"autoscaling": {"enabled": True}}}, "ScaledObject", 1),
}
BY_DEFAULT = {"NetworkPolicy": 4, "PodDisruptionBudget": 3, "Secret": 1}


@pytest.fixture(scope="module")
def defaults():
    return render()


@pytest.mark.parametrize("name", list(OPTIONAL))
def test_optional_objects_appear_only_when_enabled(defaults, name):
    values, kind, count = OPTIONAL[name]
    assert defaults.of_kind(kind) == [], f"{kind} rendered with {name} off"
    assert len(render(values).of_kind(kind)) == count, name


def test_secure_and_safe_objects_are_on_by_default_and_can_be_turned_off(defaults):
    for kind, count in BY_DEFAULT.items():
        assert len(defaults.of_kind(kind)) == count, kind
    off = render(
        {
            "networkPolicy": {"enabled": False},
            "attention": {"pdb": {"enabled": False}},
            "ffn": {"pdb": {"enabled": False}},
            "gateway": {"pdb": {"enabled": False}},
            "auth": {"existingSecret": "my-afd-secrets"},
        }
    )
    assert not off.kinds() & set(BY_DEFAULT)
    pod = off.workload("ffn")["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "secrets")["secret"]["secretName"] == (
        "my-afd-secrets"
    )


def test_the_default_install_is_the_documented_set_of_objects(defaults):
    counts: dict[str, int] = {}
    for obj in defaults.objects:
        counts[obj["kind"]] = counts.get(obj["kind"], 0) + 1
    assert counts == {
        "Deployment": 2,  # controller, gateway
        "StatefulSet": 2,  # attention, ffn
        "Service": 4,
        "ServiceAccount": 1,
        "Role": 1,
        "RoleBinding": 1,
        **BY_DEFAULT,
    }


def test_helm_lint_strict_finds_nothing_to_fix():
    everything_on = {
        "metrics": {
            k: {"enabled": True} for k in ("serviceMonitor", "prometheusRule", "dashboards")
        },
        "attention": {"autoscaling": {"enabled": True}},
        "ffn": {"autoscaling": {"enabled": True}},
        "gateway": {"ingress": {"enabled": True}},
    }
    for values in ({}, everything_on):
        report = helm_python.lint(CHART, values, strict=True, kube_version="v1.28.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
        assert not problems and not report["errors"], report
