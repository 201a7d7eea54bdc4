"""The dashboards as `deploy/grafana/build_dashboards.py` builds them, and every PromQL
query in them, for the tests."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
# What Grafana substitutes before it sends a query: a window long enough for two scrapes.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s"}


def builder():
    spec = importlib.util.spec_from_file_location(
        "build_dashboards", GRAFANA / "build_dashboards.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed() -> dict[str, dict]:
    """File name -> the dashboard JSON checked in under deploy/grafana/dashboards."""
    return {
        p.name: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))
    }


def queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every target, with Grafana's variables filled."""
    found = []
    for name, dashboard in committed().items():
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                found.append((name, panel["title"], expr))
    return found
