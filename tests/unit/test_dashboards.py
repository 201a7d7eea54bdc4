"""The Grafana dashboards: generated from code and checked in unchanged, well-formed for
Grafana, and reading only metrics the services export (by their exported names)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.common.metrics import (
    AttentionMetrics,
    ControllerMetrics,
    DataPlaneBytes,
    FFNMetrics,
    GatewayMetrics,
)
from services.common.transport import Traffic
from tests.support.dashboards import builder, committed, queries

RECORDED = {"up"}  # Prometheus's own


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_names() -> set[str]:
    """Every series name the four services' metrics expose, labelled ones included."""
    registry = CollectorRegistry()
    for metrics in (GatewayMetrics, AttentionMetrics, FFNMetrics, ControllerMetrics):
        metrics(registry)
    DataPlaneBytes(registry, lambda: Traffic().bytes)  # AFD instances' data plane
    return {
        family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]
    }


def test_the_checked_in_dashboards_are_what_the_builder_writes():
    rendered = builder().render()
    assert sorted(rendered) == sorted(committed()), "run python deploy/grafana/build_dashboards.py"
    for name, text in rendered.items():
        assert committed()[name] == json.loads(text), f"{name} is stale: rebuild it"


def test_every_panel_is_complete_for_grafana():
    for name, dashboard in committed().items():
        assert dashboard["uid"] and dashboard["title"] and dashboard["panels"], name
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat"
        variables = [v["name"] for v in dashboard["templating"]["list"]]
        assert variables == ["datasource"], name
        for p in dashboard["panels"]:
            assert p["datasource"]["uid"] == "${datasource}", (name, p["title"])
            assert {"h", "w", "x", "y"} <= set(p["gridPos"]), (name, p["title"])
            refs = [t["refId"] for t in p["targets"]]
            assert refs and len(refs) == len(set(refs)), (name, p["title"])
            assert p["fieldConfig"]["defaults"]["unit"], (name, p["title"])


def test_every_query_reads_metrics_the_services_export():
    known = exported_names() | RECORDED
    for name, title, expr in queries():
        # Metric names in the query: identifiers followed by [ { ) or space, not labels.
        used = set(re.findall(r"\b(afd_[a-z0-9_]+|up)\b(?!\s*=)", expr))
        unknown = used - known
        assert not unknown, f"{name} / {title}: {sorted(unknown)} are not exported"


def test_every_metric_is_documented():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "observability.md").read_text()
    registry = CollectorRegistry()
    for metrics in (GatewayMetrics, AttentionMetrics, FFNMetrics, ControllerMetrics):
        metrics(registry)
    DataPlaneBytes(registry, lambda: Traffic().bytes)  # AFD instances' data plane
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}`" in doc, f"{name} is missing from docs/observability.md"
