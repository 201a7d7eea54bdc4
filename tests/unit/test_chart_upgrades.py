"""What `helm upgrade` may change and what it must not: Kubernetes refuses to change a
Deployment's or StatefulSet's selector, or a StatefulSet's serviceName and volumeClaimTemplates,
so a new image, chart version or replica count must leave them as they were. And attention and
FFN instances scale independently: that is the point of AFD."""

from __future__ import annotations

import pytest

from tests.support.chart import GPU_2A2F, WORKLOAD_KINDS, Rendered, merged, render

IMMUTABLE = ("selector", "serviceName", "volumeClaimTemplates", "podManagementPolicy")


def immutable_fields(rendered: Rendered) -> dict[tuple[str, str], dict]:
    return {
        (o["kind"], o["metadata"]["name"]): {k: o["spec"].get(k) for k in IMMUTABLE}
        for o in rendered.objects
        if o["kind"] in WORKLOAD_KINDS
    }


def selectors(rendered: Rendered) -> dict[tuple[str, str], object]:
    """Every label selector that decides which pods an object means."""
    found = {}
    for o in rendered.objects:
        spec = o.get("spec", {})
        key = (o["kind"], o["metadata"]["name"])
        if o["kind"] == "Service":
            found[key] = spec["selector"]
        elif o["kind"] in WORKLOAD_KINDS | {"PodDisruptionBudget", "ServiceMonitor"}:
            found[key] = spec["selector"]
        elif o["kind"] == "NetworkPolicy":
            found[key] = spec["podSelector"]
    return found


@pytest.fixture(scope="module")
def before():
    return render(GPU_2A2F)


@pytest.fixture(scope="module")
def after():
    """The same release a year later: new image and tag, other replica counts."""
    upgrade = {
        "image": {"repository": "registry.example.com/afd-next", "tag": "9.9.9"},
        "attention": {"replicas": 7, "autoscaling": {"enabled": False}},
        "ffn": {"replicas": 3, "autoscaling": {"enabled": False}},
        "gateway": {"replicas": 5},
    }
    return render(merged(GPU_2A2F, upgrade))


def test_an_upgrade_keeps_every_immutable_field(before, after):
    assert immutable_fields(before) == immutable_fields(after)


def test_an_upgrade_keeps_every_selector(before, after):
    assert selectors(before) == selectors(after)


def test_selectors_name_neither_versions_nor_the_chart(before):
    for key, selector in selectors(before).items():
        labels = selector.get("matchLabels", selector)
        assert not {"app.kubernetes.io/version", "helm.sh/chart"} & set(labels), key


def test_every_selector_matches_its_pods_and_no_other_component_s(before):
    pods = {
        o["metadata"]["labels"]["app.kubernetes.io/component"]: o["spec"]["template"]["metadata"][
            "labels"
        ]
        for o in before.objects
        if o["kind"] in WORKLOAD_KINDS
    }
    for obj in before.objects:
        if obj["kind"] not in WORKLOAD_KINDS | {"Service", "PodDisruptionBudget"}:
            continue
        selector = obj["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        matched = {c for c, labels in pods.items() if selector.items() <= labels.items()}
        assert matched == {obj["metadata"]["labels"]["app.kubernetes.io/component"]}, (
            obj["kind"],
            obj["metadata"]["name"],
        )


def test_statefulsets_keep_their_service_and_claim_no_volumes(before):
    for role in ("attention", "ffn"):
        statefulset = before.workload(role)
        assert statefulset["spec"]["serviceName"] == f"afd-{role}"
        before.get("Service", f"afd-{role}")  # the headless Service it names exists
        # Pods hold no per-pod state: a scale-down leaves no claim behind, scale-up needs none.
        assert "volumeClaimTemplates" not in statefulset["spec"]


def test_attention_and_ffn_replicas_are_independent():
    base = {"attention": {"replicas": 2}, "ffn": {"replicas": 2}}
    for attention, ffn in [(2, 2), (4, 2), (16, 2), (2, 5)]:
        rendered = render(
            merged(base, {"attention": {"replicas": attention}, "ffn": {"replicas": ffn}})
        )
        assert rendered.workload("attention")["spec"]["replicas"] == attention
        assert rendered.workload("ffn")["spec"]["replicas"] == ffn
        # Nothing else knows the counts: the controller reads them from the StatefulSets, so
        # `kubectl scale` on one StatefulSet is a complete change.
        for role in ("controller", "gateway", "attention", "ffn"):
            args = " ".join(rendered.container(role)["args"])
            assert "--attention-instances" not in args and "--ffn-instances" not in args


def test_pods_start_in_parallel():
    rendered = render()
    for role in ("attention", "ffn"):
        assert rendered.workload(role)["spec"]["podManagementPolicy"] == "Parallel"
    controller = rendered.workload("controller")
    assert controller["spec"]["replicas"] == 1
    assert controller["spec"]["strategy"] == {"type": "Recreate"}  # never two controllers
