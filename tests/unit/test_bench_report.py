"""`afd bench`'s result files: JSON that `afd bench plot` reads back, a Markdown table with
the definitions, and a PNG of the frontier."""

from __future__ import annotations

import json

import pytest

from services.bench import report as reports
from services.bench.client import RequestResult
from services.bench.load import RunResult
from services.bench.plot import plot_frontier
from services.bench.stats import SLA, summarize


def measured(tpot_s: float, tokens: int = 5):
    """A run that started at 1.0 s: one request of `tokens` tokens, one refused."""
    times = [1.1 + i * tpot_s for i in range(tokens)]
    results = [
        RequestResult(1.0, times[-1], times, output_tokens=tokens, target_output_len=tokens),
        RequestResult(1.0, 2.0, [], error="HTTP 429: busy"),
    ]
    return summarize(results, 2.0, SLA(1e3, 50)), RunResult(results, 1.0, 2.0)


def written(tmp_path, label="AFD 1A2F", num_gpus=None):
    config = {"url": "http://x", "model": "tiny", "endpoint": "completions",
              "workload": "synthetic", "num_gpus": num_gpus}  # fmt: skip
    report = reports.Report(label, config)
    report.add({"concurrency": 1, "rate": None}, *measured(0.02))
    report.add({"concurrency": 8, "rate": None}, *measured(0.06))
    return report.write(tmp_path, "run")


def test_json_round_trips_and_has_no_nan(tmp_path):
    json_path, _ = written(tmp_path)
    data = reports.read(json_path)
    assert data["label"] == "AFD 1A2F" and len(data["points"]) == 2
    first = data["points"][0]["summary"]
    assert first["completed"] == 1 and first["errors"] == {"HTTP 429: busy": 1}
    assert first["tpot_ms"]["p50"] == pytest.approx(20)
    assert first["output_throughput_per_gpu"] is None  # no GPU count given
    assert "NaN" not in json_path.read_text()  # strict JSON for other tools
    assert set(data["definitions"]) >= {"ttft", "tpot", "itl", "goodput"}
    # Every request, timed from the run's start, for analyses the summary does not make.
    ok, refused = data["points"][0]["requests"]
    assert ok["start_s"] == 0 and ok["ttft_s"] == pytest.approx(0.1)
    assert ok["tpot_s"] == pytest.approx(0.02) and ok["output_tokens"] == 5
    assert refused["error"] == "HTTP 429: busy" and "ttft_s" not in refused


def test_markdown_has_a_row_per_load_the_definitions_and_the_errors(tmp_path):
    _, md_path = written(tmp_path, num_gpus=3)
    text = md_path.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| concurrency=")]
    assert len(rows) == 2 and "| 20.0 |" in rows[0] and "| 60.0 |" in rows[1]
    assert "out tok/s/GPU" in text and "3 GPUs" in text
    assert "**TPOT**: time per output token, per request" in text
    assert "2 x HTTP 429: busy" in text


def test_plot_draws_several_results_on_one_png(tmp_path):
    a, _ = written(tmp_path / "a", "AFD")
    b, _ = written(tmp_path / "b", "colocated")
    png = plot_frontier([reports.read(a), reports.read(b)], tmp_path / "frontier.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_reading_something_else_says_so(tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"points": []}))
    with pytest.raises(ValueError, match="not an afd bench result"):
        reports.read(other)
    with pytest.raises(ValueError, match="cannot read"):
        reports.read(tmp_path / "missing.json")
