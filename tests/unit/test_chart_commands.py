"""What each pod runs is what `afd <role>` accepts, its probes and Services point at the ports
the process listens on, the controller may read exactly what it watches, and the
NetworkPolicies let in exactly the release's own traffic.

Each container's args are parsed by the role's real argparse parser (after Kubernetes'
$(VAR) substitution), so a flag the chart passes and the process does not know fails here, not
in a crash-looping pod.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re

import pytest

from tests.support.chart import GPU_2A2F, NAMESPACE, Rendered, pod_specs, render

POD_ENV = {"POD_INDEX": "1", "POD_IP": "10.1.2.3"}
CONTROLLER_HOST = "afd-controller.serving.svc.cluster.local"


def parser_of(role: str) -> argparse.ArgumentParser:
    if role == "controller":
        from services.controller.__main__ import parse_args

        class Parser(argparse.ArgumentParser):
            def parse_args(self, argv):  # the controller's parser is built inside parse_args
                return parse_args(argv)

        return Parser()
    if role == "attention":
        from services.attention.__main__ import add_arguments
    elif role == "ffn":
        from services.ffn.__main__ import add_arguments
    else:
        from services.gateway.__main__ import add_arguments
    parser = argparse.ArgumentParser(prog=f"afd {role}")
    add_arguments(parser)
    return parser


def parse(container: dict) -> argparse.Namespace:
    """The container's command line as the process reads it, or a failure with argparse's
    message."""
    assert container["command"] == ["afd"]
    role, *argv = [re.sub(r"\$\((\w+)\)", lambda m: POD_ENV[m[1]], a) for a in container["args"]]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser_of(role).parse_args(argv)
    except SystemExit:
        why = stderr.getvalue().strip().splitlines()[-1]
        pytest.fail(f"afd {role} refuses the chart's args: {why}")


@pytest.fixture(scope="module")
def gpu() -> Rendered:
    return render(GPU_2A2F)


@pytest.fixture(scope="module")
def args(gpu) -> dict[str, argparse.Namespace]:
    return {
        role: parse(gpu.container(role)) for role in ("controller", "attention", "ffn", "gateway")
    }


@pytest.mark.parametrize("role", ["controller", "attention", "ffn", "gateway"])
def test_every_role_s_args_are_what_afd_accepts(gpu, role):
    parse(gpu.container(role))


def test_the_controller_watches_the_release_s_statefulsets(gpu, args):
    a = args["controller"]
    assert a.discovery == "kubernetes"
    assert a.kube_namespace == NAMESPACE
    selector = dict(pair.split("=") for pair in a.kube_selector.split(","))
    for role in ("attention", "ffn"):
        labels = gpu.workload(role)["metadata"]["labels"]
        pod_labels = gpu.workload(role)["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items() and selector.items() <= pod_labels.items()
        assert labels["app.kubernetes.io/component"] == role
    # ... and only them: no other release's objects.
    assert (
        render(release="other").container("controller")["args"]
        != gpu.container("controller")["args"]
    )
    assert (a.micro_batches, a.max_num_batched_tokens) == (3, 512)
    assert a.fp8_dispatch and a.ffn_layout == "split"
    assert a.cluster_secret_file == "/etc/afd/cluster-secret"


def test_members_and_the_gateway_reach_the_controller_where_it_listens(gpu, args):
    service = gpu.get("Service", "afd-controller")
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    c = args["controller"]
    assert c.advertise_host == CONTROLLER_HOST  # where members find the TCPStore
    assert (c.port, c.store_port, c.metrics_port) == (
        ports["grpc"],
        ports["store"],
        ports["metrics"],
    )
    for role in ("attention", "ffn", "gateway"):
        assert args[role].controller == f"{CONTROLLER_HOST}:{ports['grpc']}", role


def test_instances_take_their_index_from_the_pod_and_advertise_its_ip(args):
    for role in ("attention", "ffn"):
        a = args[role]
        assert a.index == 1 and a.advertise_host == "10.1.2.3", role
        assert a.host == "0.0.0.0" and a.device == "cuda", role


def test_the_gateway_discovers_attention_instances_from_the_controller(args):
    g = args["gateway"]
    assert not g.attention  # no fixed list: the controller's membership
    assert g.api_key_file == "/etc/afd/api-keys"
    assert g.served_model_name == "step3" and g.tpot_sla_ms == 50


def test_the_role_settings_reach_the_processes(args):
    a = args["attention"]
    assert (a.max_num_seqs, a.max_model_len, a.kv_cache_dtype) == (128, 4096, "fp8")
    assert a.kv_cache_bytes == 60 * 2**30


def test_the_cluster_s_facts_are_given_to_the_controller_alone(gpu):
    """The instances take them from the membership: none can be set to disagree."""
    facts = ("--micro-batches", "--max-num-batched-tokens", "--fp8-dispatch", "--ffn-layout")
    for role in ("attention", "ffn"):
        passed = [arg for arg in gpu.container(role)["args"] if arg.startswith(facts)]
        assert passed == [], role
    controller = gpu.container("controller")["args"]
    assert all(any(arg.startswith(flag) for arg in controller) for flag in facts)


def test_probes_and_ports_are_where_the_process_listens(gpu, args):
    for role in ("controller", "attention", "ffn", "gateway"):
        container = gpu.container(role)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        a = args[role]
        listen = ports["http" if role == "gateway" else "grpc"]
        assert a.port == listen, role
        if role != "gateway":
            assert a.metrics_port == ports["metrics"], role
        for probe in ("readinessProbe", "livenessProbe"):
            spec = container[probe]
            ((kind, target),) = [
                (k, v) for k, v in spec.items() if k in ("grpc", "httpGet", "tcpSocket")
            ]
            port = target["port"]
            assert (ports[port] if isinstance(port, str) else port) == listen, (role, probe)
    # Readiness: gRPC health (NOT_SERVING while loading, re-forming or draining) and /ready.
    for role in ("attention", "ffn"):
        assert "grpc" in gpu.container(role)["readinessProbe"]
        # Liveness must not restart a pod that is only loading or re-forming.
        assert "tcpSocket" in gpu.container(role)["livenessProbe"]
    gateway = gpu.container("gateway")
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"


def test_every_service_port_targets_a_port_its_pods_declare(gpu):
    pods = {role: gpu.container(role) for role in ("controller", "attention", "ffn", "gateway")}
    for service in gpu.of_kind("Service"):
        role = service["spec"]["selector"]["app.kubernetes.io/component"]
        declared = {p["name"] for p in pods[role]["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in declared, (service["metadata"]["name"], port)


def test_draining_pods_get_longer_than_their_drain_timeout(gpu, args):
    specs = pod_specs(gpu)
    for role in ("attention", "gateway"):
        assert specs[role]["terminationGracePeriodSeconds"] > args[role].drain_timeout, role


def test_the_controller_may_read_pods_and_statefulsets_in_its_namespace_and_nothing_else(gpu):
    (role,) = gpu.of_kind("Role")
    assert not gpu.of_kind("ClusterRole") and not gpu.of_kind("ClusterRoleBinding")
    rules = {
        (group, resource): sorted(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert rules == {
        ("", "pods"): ["get", "list", "watch"],
        ("apps", "statefulsets"): ["get", "list", "watch"],
    }
    assert not any(rule.get("resourceNames") for rule in role["rules"])
    (binding,) = gpu.of_kind("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    (subject,) = binding["subjects"]
    controller_pod = pod_specs(gpu)["controller"]
    assert subject == {
        "kind": "ServiceAccount",
        "name": controller_pod["serviceAccountName"],
        "namespace": NAMESPACE,
    }


# NetworkPolicy semantics, enough for the chart's policies: a pod no policy selects takes
# anything; a selected pod takes what some rule of some selecting policy lets in.


def matches(selector: dict, labels: dict) -> bool:
    """A label selector; the empty one matches everything."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def allowed(policies: list[dict], source: dict, namespace: dict, target: dict, port: int) -> bool:
    selecting = [p for p in policies if matches(p["spec"]["podSelector"], target)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and port not in [p["port"] for p in rule["ports"]]:
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                same_namespace = namespace["kubernetes.io/metadata.name"] == NAMESPACE
                if "namespaceSelector" in peer:
                    namespace_ok = matches(peer["namespaceSelector"], namespace)
                else:
                    namespace_ok = same_namespace
                if namespace_ok and matches(peer.get("podSelector", {}), source):
                    return True
    return False


def pod(release: str, component: str) -> dict:
    return {
        "app.kubernetes.io/name": "afd",
        "app.kubernetes.io/instance": release,
        "app.kubernetes.io/component": component,
    }


HOME = {"kubernetes.io/metadata.name": NAMESPACE}
MONITORING = {"kubernetes.io/metadata.name": "monitoring"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}
EPHEMERAL = 45678  # a torch.distributed data-plane port


@pytest.fixture(scope="module")
def policies(gpu):
    return gpu.of_kind("NetworkPolicy")


@pytest.mark.parametrize(
    ("source", "target", "port"),
    [
        ("attention", "ffn", EPHEMERAL),
        ("ffn", "attention", EPHEMERAL),
        ("attention", "attention", EPHEMERAL),
        ("attention", "controller", 29500),
        ("ffn", "controller", 50051),
        ("gateway", "controller", 50051),
        ("gateway", "attention", 50051),
    ],
)
def test_the_release_s_pods_reach_what_they_use(policies, source, target, port):
    assert allowed(policies, pod("afd", source), HOME, pod("afd", target), port)


@pytest.mark.parametrize(
    ("source", "target", "port"),
    [
        ("gateway", "ffn", 50051),  # the gateway never calls an FFN instance
        ("gateway", "attention", EPHEMERAL),  # nor takes part in the data plane
        ("gateway", "controller", 29500),
    ],
)
def test_the_gateway_reaches_only_the_grpc_ports_it_calls(policies, source, target, port):
    assert not allowed(policies, pod("afd", source), HOME, pod("afd", target), port)


@pytest.mark.parametrize("target", ["controller", "attention", "ffn"])
def test_strangers_reach_neither_the_control_nor_the_data_plane(policies, target):
    for port in (50051, 29500, EPHEMERAL):
        assert not allowed(
            policies, pod("other-release", "attention"), HOME, pod("afd", target), port
        )
        assert not allowed(policies, {"app": "anything"}, HOME, pod("afd", target), port)
        assert not allowed(
            policies,
            pod("afd", "attention"),
            {"kubernetes.io/metadata.name": "elsewhere"},
            pod("afd", target),
            port,
        )


def test_prometheus_reaches_the_metrics_ports_only(policies):
    for target in ("controller", "attention", "ffn"):
        assert allowed(policies, PROMETHEUS, MONITORING, pod("afd", target), 9400), target
        assert not allowed(policies, PROMETHEUS, MONITORING, pod("afd", target), 50051), target
    assert allowed(policies, PROMETHEUS, MONITORING, pod("afd", "gateway"), 8000)


def test_the_api_port_is_open_unless_sources_are_given(policies):
    assert allowed(
        policies,
        {"app": "client"},
        {"kubernetes.io/metadata.name": "apps"},
        pod("afd", "gateway"),
        8000,
    )
    assert not allowed(policies, {"app": "client"}, HOME, pod("afd", "gateway"), 9400)
    ingress_only = [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    ]
    limited = render({"networkPolicy": {"gatewayFrom": ingress_only}}).of_kind("NetworkPolicy")
    nginx = {"kubernetes.io/metadata.name": "ingress-nginx"}
    assert allowed(limited, {"app": "nginx"}, nginx, pod("afd", "gateway"), 8000)
    assert not allowed(
        limited,
        {"app": "client"},
        {"kubernetes.io/metadata.name": "apps"},
        pod("afd", "gateway"),
        8000,
    )
    assert allowed(limited, PROMETHEUS, MONITORING, pod("afd", "gateway"), 8000)  # /metrics
