"""The chart renders valid Kubernetes objects for the default values, a 2A2F GPU deployment and a
small CPU-only install, and every pod is what the processes need and no more.

Built-in kinds are validated strictly against the API schemas of the oldest Kubernetes the
chart supports and the newest kubernetes-validate ships; the custom resources (ServiceMonitor,
PrometheusRule, ScaledObject), which it has no schema for, are checked by hand here.
"""

from __future__ import annotations

import copy
import shutil
import subprocess

import helm_python
import pytest
import yaml

from tests.support.chart import (
    CHART,
    CPU_SMALL,
    CUSTOM_KINDS,
    GPU_2A2F,
    ROOT,
    chart,
    pod_specs,
    render,
    validation_errors,
)

VALUES = {"default": {}, "gpu-2a2f": GPU_2A2F, "cpu-small": CPU_SMALL}
ROLES = ("controller", "attention", "ffn", "gateway")


@pytest.fixture(scope="module", params=list(VALUES))
def rendered(request):
    return render(VALUES[request.param])


@pytest.fixture(scope="module")
def gpu():
    return render(GPU_2A2F)


@pytest.fixture(scope="module")
def cpu():
    return render(CPU_SMALL)


def test_every_built_in_object_is_valid_kubernetes(rendered):
    errors = [
        e for o in rendered.objects if o["kind"] not in CUSTOM_KINDS for e in validation_errors(o)
    ]
    assert not errors, "\n".join(errors)


def test_strict_validation_refuses_a_misspelt_field(gpu):
    # The oracle above is worth something only if it sees an unknown field.
    statefulset = copy.deepcopy(gpu.workload("attention"))
    statefulset["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert validation_errors(statefulset)


def test_every_object_is_named_by_the_release_and_lives_in_its_namespace(rendered):
    for obj in rendered.objects:
        meta = obj["metadata"]
        assert meta["name"].startswith("afd"), meta["name"]
        if obj["kind"] != "ConfigMap":  # dashboards may go to Grafana's namespace
            assert meta["namespace"] == "serving", (obj["kind"], meta["name"])
        assert meta["labels"]["app.kubernetes.io/instance"] == "afd"


def test_every_pod_runs_non_root_read_only_with_nothing_added(rendered):
    rdma = any(e["name"] == "NCCL_IB_HCA" for e in rendered.container("ffn")["env"])
    for component, pod in pod_specs(rendered).items():
        added = ["IPC_LOCK"] if rdma and component in ("attention", "ffn") else []
        assert pod["securityContext"]["runAsNonRoot"] is True, component
        assert pod["securityContext"]["runAsUser"] != 0, component
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, component
        containers = [(c, added) for c in pod["containers"]]
        containers += [(c, []) for c in pod.get("initContainers", [])]
        for c, expected_added in containers:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (component, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (component, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (component, c["name"])
            assert sc["capabilities"].get("add", []) == expected_added, (component, c["name"])
        assert not pod.get("hostNetwork"), component


def test_only_the_controller_holds_a_kubernetes_api_token(rendered):
    for component, pod in pod_specs(rendered).items():
        token = pod["automountServiceAccountToken"]
        assert token is (component == "controller"), component
        if component == "controller":
            assert pod["serviceAccountName"] == "afd-controller"


def test_every_pod_has_memory_backed_shm_and_a_writable_tmp_for_home_and_caches(rendered):
    for component, pod in pod_specs(rendered).items():
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory", component
        assert "sizeLimit" in volumes[mounts["/dev/shm"]["name"]]["emptyDir"], component
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]], component
        assert not mounts["/tmp"].get("readOnly"), component
        env = {e["name"]: e.get("value") for e in container["env"]}
        for var in ("HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
            assert env[var].startswith("/tmp"), (component, var)


def test_every_pod_reads_the_model_read_only_at_one_path_and_the_secrets_from_files(rendered):
    for component, pod in pod_specs(rendered).items():
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/model"]["readOnly"] is True, component
        assert mounts["/etc/afd"]["readOnly"] is True, component
        assert "--model=/model" in container["args"], component
        assert "--cluster-secret-file=/etc/afd/cluster-secret" in container["args"], component
        secret = next(v for v in pod["volumes"] if v["name"] == "secrets")["secret"]
        assert secret["secretName"] == "afd-secrets"


def test_the_secret_holds_api_keys_and_the_cluster_secret(gpu):
    import base64

    data = gpu.get("Secret", "afd-secrets")["data"]
    assert base64.b64decode(data["api-keys"]).decode().splitlines() == ["sk-one", "sk-two"]
    assert base64.b64decode(data["cluster-secret"]).decode() == "s3cret"


def test_without_keys_the_chart_generates_an_api_key_and_a_cluster_secret():
    import base64

    data = render().get("Secret", "afd-secrets")["data"]
    (key,) = base64.b64decode(data["api-keys"]).decode().splitlines()
    assert key.startswith("sk-") and len(key) > 32
    assert len(base64.b64decode(data["cluster-secret"])) == 64


def test_a_gpu_deployment_gives_each_instance_one_gpu_and_runs_it_on_cuda(gpu):
    for role in ("attention", "ffn"):
        container = gpu.container(role)
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, role
        assert "--device=cuda" in container["args"], role
    for role in ("controller", "gateway"):
        assert "nvidia.com/gpu" not in gpu.container(role)["resources"].get("limits", {}), role


def test_a_cpu_install_requests_no_gpu_and_runs_on_cpu(cpu):
    for role in ROLES:
        container = cpu.container(role)
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {}), role
    for role in ("attention", "ffn"):
        assert "--device=cpu" in cpu.container(role)["args"], role
    assert cpu.container("attention")["image"] == "afd:0.1.0-cpu"


def test_rdma_requests_the_device_sets_ncclenv_and_adds_only_ipc_lock(gpu):
    for role in ("attention", "ffn"):
        container = gpu.container(role)
        assert container["resources"]["limits"]["rdma/rdma_shared_device_a"] == 1
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["NCCL_IB_HCA"] == "mlx5" and env["NCCL_SOCKET_IFNAME"] == "eth0"
        assert container["securityContext"]["capabilities"] == {
            "drop": ["ALL"],
            "add": ["IPC_LOCK"],
        }
    for role in ("controller", "gateway"):
        assert "add" not in gpu.container(role)["securityContext"]["capabilities"]


def test_host_networking_only_when_asked_for_with_rdma():
    hostnet = render(
        {"rdma": {"enabled": True, "hostNetwork": True}, "networkPolicy": {"enabled": False}}
    )
    for component, pod in pod_specs(hostnet).items():
        assert pod.get("hostNetwork", False) is (component in ("attention", "ffn")), component
        if component in ("attention", "ffn"):
            assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert not any(
        p.get("hostNetwork") for p in pod_specs(render({"rdma": {"hostNetwork": True}})).values()
    )


def test_model_sources(cpu):
    host = next(v for v in pod_specs(cpu)["ffn"]["volumes"] if v["name"] == "model")
    assert host["hostPath"] == {"path": "/var/lib/afd/tiny", "type": "Directory"}

    nfs = {"nfs": {"server": "nfs.example.com", "path": "/models"}}
    copied = render({"model": {"source": "copy", "copy": {"source": nfs}, "subPath": "step3"}})
    for component, pod in pod_specs(copied).items():
        volumes = {v["name"]: v for v in pod["volumes"]}
        if component in ("attention", "ffn"):  # they read every weight: a local copy first
            (init,) = pod["initContainers"]
            assert init["args"] == ["cp -R /model-source/step3/. /model/"]
            assert volumes["model-source"]["nfs"] == nfs["nfs"]
            assert "emptyDir" in volumes["model"]
        else:  # config, tokenizer and tensor headers: straight from the source
            assert "initContainers" not in pod, component
            assert volumes["model"]["nfs"] == nfs["nfs"], component
            (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model"]
            assert mount["subPath"] == "step3", component
    assert not any(validation_errors(o) for o in copied.objects if o["kind"] not in CUSTOM_KINDS)


def test_the_service_monitor_scrapes_every_process_with_the_labels_the_alerts_read(gpu):
    (monitor,) = gpu.of_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = {
        s["metadata"]["name"]: {p["name"] for p in s["spec"]["ports"]}
        for s in gpu.of_kind("Service")
        if selector.items() <= s["metadata"]["labels"].items()
    }
    assert set(scraped) == {"afd-controller", "afd-attention", "afd-ffn", "afd-gateway"}
    endpoints = {e["port"]: e for e in monitor["spec"]["endpoints"]}
    assert set(endpoints) == {"metrics", "http"}
    for name, ports in scraped.items():  # each Service has exactly one scraped port
        assert len(ports & set(endpoints)) == 1, name
    for endpoint in endpoints.values():
        assert endpoint["path"] == "/metrics"
        targets = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
        assert targets["component"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
        assert targets["index"] == ["__meta_kubernetes_pod_label_apps_kubernetes_io_pod_index"]


def test_the_prometheus_rule_is_the_repository_s_alert_file(gpu):
    (rule,) = gpu.of_kind("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "afd-alerts.yml").read_text())
    assert rule["spec"] == alerts  # {{ $value }} and {{ $labels }} reach Prometheus untouched


def test_the_dashboard_configmaps_are_the_repository_s_dashboards(gpu):
    import json

    maps = gpu.of_kind("ConfigMap")
    committed = {
        p.name: json.loads(p.read_text())
        for p in (ROOT / "deploy" / "grafana" / "dashboards").glob("*.json")
    }
    shipped = {}
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((name, text),) = cm["data"].items()
        shipped[name] = json.loads(text)
    assert shipped == committed


def test_keda_scales_each_statefulset_on_its_own_metrics(gpu):
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in gpu.of_kind("ScaledObject")}
    assert set(scaled) == {"afd-attention", "afd-ffn"}
    for name, obj in scaled.items():
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        assert obj["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
        assert obj["spec"]["minReplicaCount"] <= obj["spec"]["maxReplicaCount"]
        for trigger in obj["spec"]["triggers"]:
            assert trigger["type"] == "prometheus"
            assert trigger["metricType"] in ("Value", "AverageValue")
            meta = trigger["metadata"]
            assert meta["serverAddress"].startswith("http")
            assert f'service="{name}"' in meta["query"] and 'namespace="serving"' in meta["query"]
            float(meta["threshold"])  # KEDA wants a number in a string
    queries = {
        n: " ".join(t["metadata"]["query"] for t in o["spec"]["triggers"])
        for n, o in scaled.items()
    }
    assert "afd_attention_requests_waiting" in queries["afd-attention"]
    assert "afd_gateway_requests_waiting" in queries["afd-attention"], "the gateways' queue"
    assert "afd_attention_kv_blocks_used" in queries["afd-attention"]
    assert "afd_attention_kv_blocks_total" in queries["afd-attention"]
    assert "afd_ffn_micro_batch_tokens_sum" in queries["afd-ffn"]
    # An autoscaled StatefulSet leaves its replica count to the autoscaler (helm upgrade
    # would otherwise set it back).
    assert "replicas" not in gpu.workload("attention")["spec"]
    assert "replicas" not in gpu.workload("ffn")["spec"]


def test_the_ingress_sends_every_path_to_the_gateway(gpu):
    (ingress,) = gpu.of_kind("Ingress")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "afd.example.com"
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/" and path["backend"]["service"] == {
        "name": "afd-gateway",
        "port": {"name": "http"},
    }


def test_notes_tell_how_to_reach_the_api_and_the_dashboards(rendered, gpu):
    assert "kubectl -n serving get secret afd-secrets" in rendered.notes
    assert "/v1/chat/completions" in rendered.notes
    assert "dashboards" in rendered.notes.lower()
    assert "http://afd.example.com" in gpu.notes
    assert "port-forward svc/afd-gateway" in render().notes


def test_host_networking_and_network_policies_are_refused_together():
    # Host-network pods send from their node's address: a policy would cut them off.
    with pytest.raises(helm_python.HelmError, match="networkPolicy.enabled=false"):
        render({"rdma": {"enabled": True, "hostNetwork": True}})


def test_the_chart_links_to_the_one_copy_of_the_alerts_and_dashboards():
    # Helm reads only files inside the chart and follows links; a copy would drift.
    files = CHART / "files"
    for link, target in [
        ("afd-alerts.yml", ROOT / "deploy" / "prometheus" / "afd-alerts.yml"),
        ("dashboards", ROOT / "deploy" / "grafana" / "dashboards"),
    ]:
        assert (files / link).is_symlink(), link
        assert (files / link).resolve() == target.resolve(), link


def test_the_packaged_chart_carries_the_alerts_and_dashboards(tmp_path):
    # What users install from a chart repository: `helm package` stores the linked files.
    archive = helm_python.package(CHART, destination=tmp_path)
    on = {"metrics": {"prometheusRule": {"enabled": True}, "dashboards": {"enabled": True}}}
    with helm_python.Chart.load(archive) as packaged:
        from_archive = packaged.render(on, name="afd", namespace="serving")
    from_folder = chart().render(on, name="afd", namespace="serving")
    for template in ("prometheusrule.yaml", "dashboards-configmap.yaml"):
        path = f"afd/templates/{template}"
        assert from_archive[path] == from_folder[path] and "kind:" in from_archive[path]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (make prometheus)")
def test_every_autoscaling_query_is_promql_prometheus_accepts(tmp_path):
    rendered = render({
        "attention": {"autoscaling": {"enabled": True}},
        "ffn": {"autoscaling": {"enabled": True}},
    })  # fmt: skip
    queries = [
        trigger["metadata"]["query"]
        for obj in rendered.of_kind("ScaledObject")
        for trigger in obj["spec"]["triggers"]
    ]
    rules = {"groups": [{"name": "keda", "rules": [
        {"record": f"keda_query_{i}", "expr": query} for i, query in enumerate(queries)
    ]}]}  # fmt: skip
    path = tmp_path / "keda.yml"
    path.write_text(yaml.safe_dump(rules))
    check = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True)
    assert len(queries) >= 3 and check.returncode == 0, check.stdout + check.stderr


def test_an_ffn_pod_of_four_gpus_runs_its_four_processes_and_each_is_scraped():
    values = copy.deepcopy(GPU_2A2F)
    values["ffn"]["gpusPerInstance"] = 4
    values["ffn"]["resources"]["limits"]["nvidia.com/gpu"] = 4
    values["ffn"]["autoscaling"]["maxReplicas"] = 8
    rendered = render(values)
    errors = [
        e for o in rendered.objects if o["kind"] not in CUSTOM_KINDS for e in validation_errors(o)
    ]
    assert not errors, "\n".join(errors)
    ffn = rendered.container("ffn")
    assert ffn["args"][:3] == ["ffn-pod", "--processes=4", "--index=$(POD_INDEX)"]
    assert {"--port=50051", "--metrics-port=9400", "--device=cuda"} <= set(ffn["args"])
    assert [p["containerPort"] for p in ffn["ports"]] == [50051, 9400, 9401, 9402, 9403]
    controller = rendered.container("controller")
    assert "--gpus-per-ffn-instance=4" in controller["args"]
    # Two long-polls per process, at most 8 attention + 8 FFN pods of 4: 16 + 2 x 40.
    assert "--max-workers=96" in controller["args"]
    (monitor,) = rendered.of_kind("ServiceMonitor")
    ports = {e["port"]: e for e in monitor["spec"]["endpoints"]}
    assert set(ports) == {"metrics", "http", "metrics-1", "metrics-2", "metrics-3"}
    assert {"targetLabel": "process", "replacement": "3"} in ports["metrics-3"]["relabelings"]
    (service,) = [s for s in rendered.of_kind("Service") if s["metadata"]["name"] == "afd-ffn"]
    assert {p["name"] for p in service["spec"]["ports"]} >= {"metrics-1", "metrics-3"}
    (policy,) = [p for p in rendered.of_kind("NetworkPolicy") if p["metadata"]["name"] == "afd-ffn"]
    assert {"port": 9400, "endPort": 9403, "protocol": "TCP"} in policy["spec"]["ingress"][-1][
        "ports"
    ]


def test_an_ffn_pod_whose_gpus_differ_from_its_processes_is_refused():
    values = copy.deepcopy(GPU_2A2F)
    values["ffn"]["gpusPerInstance"] = 4
    with pytest.raises(helm_python.HelmError, match="nvidia.com/gpu is 1 but ffn.gpusPerInstance"):
        render(values)
    values["ffn"]["resources"]["limits"]["nvidia.com/gpu"] = 4
    values["controller"]["ffnLayout"] = "replicated"
    with pytest.raises(helm_python.HelmError, match="takes controller.ffnLayout split"):
        render(values)
