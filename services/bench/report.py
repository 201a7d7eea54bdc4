"""A run's results as a JSON file (for `afd bench plot` and scripts) and a Markdown table
(for people and docs), written side by side.

One format for a single run and for a sweep: a list of points, each a load and its summary.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.bench.client import RequestResult
from services.bench.load import RunResult
from services.bench.stats import DEFINITIONS, Summary, tpot, ttft

FORMAT = "afd-bench/1"


@dataclass
class Report:
    label: str  # names the configuration in plots and tables
    config: dict[str, Any]  # what was run: server, model, workload, bounds, SLA
    points: list[dict[str, Any]] = field(default_factory=list)  # {"load": ..., "summary": ...}

    def add(self, load: dict[str, Any], summary: Summary, run: RunResult) -> None:
        requests = [request_record(r, run.started) for r in run.results]
        self.points.append({"load": load, "summary": summary.to_dict(), "requests": requests})

    def to_json(self) -> dict[str, Any]:
        return _finite(
            {
                "format": FORMAT,
                "label": self.label,
                "config": self.config,
                "definitions": DEFINITIONS,
                "points": self.points,
            }
        )

    def write(self, folder: Path, stem: str) -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
        json_path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        md_path.write_text(markdown(self.to_json()))
        return json_path, md_path


def request_record(result: RequestResult, started: float) -> dict[str, Any]:
    """One request, for analyses the summary does not make; times in s from the run's start."""
    record = {
        "start_s": round(result.start - started, 6),
        "end_s": round(result.end - started, 6),
        "prompt_tokens": result.prompt_tokens,
        "output_tokens": result.output_tokens,
    }
    if result.ok:
        per_token = tpot(result)
        record["ttft_s"] = round(ttft(result), 6)
        record["tpot_s"] = None if per_token is None else round(per_token, 6)
    else:
        record["error"] = result.error
    return record


def read(path: str | Path) -> dict[str, Any]:
    """A report written by `Report.write`; a clear error for anything else."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read a bench result ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f'{path}: not an afd bench result (no "format": "{FORMAT}")')
    return data


def _finite(value: Any) -> Any:
    """NaN (a latency nobody measured) becomes null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}" if value < 10 else f"{value:.0f}"


def markdown(data: dict[str, Any]) -> str:
    config = data["config"]
    sla = data["points"][0]["summary"]["sla"] if data["points"] else {}
    per_gpu = config.get("num_gpus")
    lines = [
        f"# afd bench: {data['label']}",
        "",
        f"Server {config['url']}, model `{config['model']}`, {config['endpoint']} endpoint; "
        f"workload {config['workload']}; SLA TTFT <= {sla.get('ttft_ms')} ms, "
        f"TPOT <= {sla.get('tpot_ms')} ms" + (f"; {per_gpu} GPUs" if per_gpu else "") + ".",
        "",
        "| load | ok | failed | req/s | out tok/s | goodput tok/s"
        + (" | out tok/s/GPU | goodput/GPU" if per_gpu else "")
        + " | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p90 | TPOT p99 | ITL p50 | ITL p99"
        " | E2E p50 | E2E p99 |",
    ]
    lines.append("|" + "---|" * (lines[-1].count("|") - 1))
    for point in data["points"]:
        s = point["summary"]
        load = ",".join(f"{k}={v:g}" for k, v in point["load"].items() if v is not None)
        cells = [load, str(s["completed"]), str(s["failed"]), _rate(s["request_throughput"])]
        cells += [_rate(s["output_throughput"]), _rate(s["goodput"])]
        if per_gpu:
            cells += [_rate(s["output_throughput_per_gpu"]), _rate(s["goodput_per_gpu"])]
        for name, stats in (("ttft_ms", "50 99"), ("tpot_ms", "50 90 99"), ("itl_ms", "50 99")):
            cells += [_ms(s[name][f"p{q}"]) for q in stats.split()]
        cells += [_ms(s["e2e_ms"]["p50"]), _ms(s["e2e_ms"]["p99"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Latencies in ms. Definitions:", ""]
    lines += [f"- **{name.upper()}**: {text}" for name, text in data["definitions"].items()]
    errors = sum((Counter(p["summary"]["errors"]) for p in data["points"]), Counter())
    if errors:
        lines += ["", "Errors:", ""] + [f"- {n} x {m}" for m, n in errors.items()]
    return "\n".join(lines) + "\n"
