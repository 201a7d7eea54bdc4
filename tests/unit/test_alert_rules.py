"""The alert rules parse, and each fires on the series it watches for and stays quiet on a
healthy twin: `promtool test rules` (Prometheus's own tool, installed by `make prometheus`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=RULES, capture_output=True, text=True)


def test_the_alert_rules_are_valid():
    result = promtool("check", "rules", "afd-alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_when_it_should_and_only_then():
    result = promtool("test", "rules", "afd-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
