"""The Helm chart rendered offline into Kubernetes objects, for the chart tests.

helm-python-sdk (Helm's Go SDK through ctypes: the real template engine and schema check) does
what `helm template` does; kubernetes-validate checks each object against the Kubernetes API's
own schemas, strictly (an unknown field is an error). No cluster is involved: `lookup` sees
nothing, so generated secrets are fresh on every render.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import helm_python
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "afd"
RELEASE = "afd"
NAMESPACE = "serving"
# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion: the pod-index label) and
# the newest kubernetes-validate ships schemas for.
KUBERNETES_VERSIONS = ("1.28", kubernetes_validate.utils.latest_version().rsplit(".", 1)[0])
# Custom resources kubernetes-validate has no schema for; the tests check their shape.
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}

GPU = {"nvidia.com/gpu": 1}

# The paper's smallest disaggregated deployment, as in STEP3.md's 4K row: 2 attention and
# 2 FFN instances (one GPU each), with RDMA, FP8 KV cache and dispatch, monitoring and
# autoscaling on: every optional object.
GPU_2A2F = {
    "image": {"repository": "registry.example.com/afd", "tag": "0.1.0"},
    "model": {"source": "pvc", "pvc": {"claimName": "step3-fp8"}, "subPath": "step3"},
    "auth": {"apiKeys": ["sk-one", "sk-two"], "clusterSecret": "s3cret"},
    "controller": {"microBatches": 3, "fp8Dispatch": True, "ffnLayout": "split"},
    "attention": {
        "replicas": 2,
        "maxNumSeqs": 128,
        "maxModelLen": 4096,
        "kvCacheDtype": "fp8",
        "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "200Gi"}},
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"},
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8},
    },
    "ffn": {
        "replicas": 2,
        "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "200Gi"}},
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 4},
    },
    "network": {"ncclSocketIfname": "eth0"},
    "rdma": {"enabled": True},
    "gateway": {
        "tpotSlaMs": 50,
        "ingress": {"enabled": True, "className": "nginx", "hosts": [{"host": "afd.example.com"}]},
    },
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True},
        "dashboards": {"enabled": True},
    },
}

# A small CPU-only install (the tiny model on a laptop cluster): no GPU anywhere, the checkpoint
# from a node's folder, no NetworkPolicy or PodDisruptionBudget.
CPU_SMALL = {
    "image": {"repository": "afd", "tag": "0.1.0-cpu"},
    "model": {
        "source": "hostPath",
        "hostPath": {"path": "/var/lib/afd/tiny"},
        "servedModelName": "tiny",
    },
    "attention": {
        "replicas": 1,
        "maxModelLen": None,
        "resources": {
            "requests": {"cpu": "1", "memory": "2Gi"},
            "limits": {"memory": "4Gi", "nvidia.com/gpu": 0},
        },
        "tolerations": [],
        "pdb": {"enabled": False},
    },
    "ffn": {
        "replicas": 2,
        "resources": {
            "requests": {"cpu": "1", "memory": "2Gi"},
            "limits": {"memory": "4Gi", "nvidia.com/gpu": 0},
        },
        "tolerations": [],
        "pdb": {"enabled": False},
    },
    "gateway": {"replicas": 1, "pdb": {"enabled": False}},
    "networkPolicy": {"enabled": False},
    "shm": {"sizeLimit": "1Gi"},
}


@dataclass(frozen=True)
class Rendered:
    """One render: the objects in template order and NOTES.txt."""

    objects: list[dict]
    notes: str

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind} {name}: {len(found)} rendered"
        return found[0]

    def kinds(self) -> set[str]:
        return {o["kind"] for o in self.objects}

    def workload(self, component: str) -> dict:
        """The Deployment or StatefulSet of a component (controller, attention, ffn, gateway)."""
        found = [
            o for o in self.objects if o["kind"] in WORKLOAD_KINDS and component_of(o) == component
        ]
        assert len(found) == 1, f"{component}: {len(found)} workloads"
        return found[0]

    def container(self, component: str) -> dict:
        (container,) = self.workload(component)["spec"]["template"]["spec"]["containers"]
        return container


def component_of(obj: dict) -> str | None:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")


@functools.cache
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART)


def render(values: dict | None = None, release: str = RELEASE) -> Rendered:
    """`helm template release CHART -n serving -f values` (the schema checked first)."""
    manifests = chart().render(values or {}, name=release, namespace=NAMESPACE, is_install=True)
    objects = [
        obj
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml")
        for obj in yaml.safe_load_all(text)
        if obj
    ]
    notes = next((t for p, t in manifests.items() if p.endswith("NOTES.txt")), "")
    return Rendered(objects, notes)


def schema_error(values: dict) -> str | None:
    """What the chart's values.schema.json says about `values` (None: accepted)."""
    try:
        chart().validate_schema(chart().merge_values(values))
    except helm_python.HelmValuesError as err:
        return str(err)
    return None


def validation_errors(obj: dict) -> list[str]:
    """Strict validation of a built-in object against every KUBERNETES_VERSIONS' schema."""
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(p) for p in err.path)
            errors.append(
                f"{obj['kind']} {obj['metadata']['name']} ({version}) {where}: {err.message}"
            )
    return errors


def pod_specs(rendered: Rendered) -> dict[str, dict]:
    """component -> its pod template's spec."""
    return {
        component_of(o): o["spec"]["template"]["spec"]
        for o in rendered.objects
        if o["kind"] in WORKLOAD_KINDS
    }


def merged(*layers: dict) -> dict:
    """Deep merge of values dictionaries (later ones win), as several -f files are."""
    out: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = value
    return out
