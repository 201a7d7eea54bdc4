"""Measured stage times in place of the paper's efficiencies: `afd plan deploy --calibration`.

The file (JSON; docs/planner.md has the full format and docs/results/planner/ examples)
names the GPU and model it was measured on and lists per-layer, per-micro-batch times in
microseconds:

    {"gpu": "H200", "model": "step3", "kv_bytes_per_element": 1, "network_gbps": 400,
     "source": "how, where, when",
     "attention": [{"micro_batch": 128, "context": 4096, "us": 433}],
     "ffn": [{"tokens": 2048, "ffn_gpus": 16, "layout": "split", "moe": true, "us": 544}],
     "network": [{"bytes": 3670016, "us": 182}]}

Each measurement is set against the planner's own roofline at the same point (`stages`).
One point of a stage gives its efficiency (roofline / measured); two or more fit
measured = overhead + roofline / efficiency by least squares. A stage with no points keeps
the paper's fit. This module does not plan; it only turns times into `Efficiency`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.cluster_config import LAYOUTS, SPLIT
from services.planner.hardware import Accelerator, find_accelerator
from services.planner.models import load_model
from services.planner.shapes import ModelShape
from services.planner.stages import (
    Efficiency,
    StageFit,
    attention_roofline,
    ffn_roofline,
)

STAGES = ("attention", "ffn", "network")
US = 1e-6


@dataclass(frozen=True)
class Calibration:
    gpu: str
    model: str
    source: str
    efficiency: Efficiency
    num_points: dict[str, int]  # measurements per stage


def fit(pairs: list[tuple[float, float]], stage: str) -> StageFit:
    """StageFit from (roofline_s, measured_s) pairs."""
    if len(pairs) == 1 or len({round(r, 12) for r, _ in pairs}) == 1:
        slope, overhead = sum(m for _, m in pairs) / sum(r for r, _ in pairs), 0.0
    else:
        n = len(pairs)
        mean_r = sum(r for r, _ in pairs) / n
        mean_m = sum(m for _, m in pairs) / n
        var = sum((r - mean_r) ** 2 for r, _ in pairs)
        slope = sum((r - mean_r) * (m - mean_m) for r, m in pairs) / var
        overhead = mean_m - slope * mean_r
        if overhead < 0 or slope <= 0:  # no fixed cost to find: a line through the origin
            slope = sum(r * m for r, m in pairs) / sum(r * r for r, _ in pairs)
            overhead = 0.0
    efficiency = 1 / slope
    if efficiency > 1.5:
        raise ValueError(
            f"calibration: the {stage} times are {efficiency:.2f}x faster than the datasheet "
            "roofline allows; check that they are microseconds per layer and micro-batch and "
            "that 'gpu' names the GPU they were measured on"
        )
    return StageFit(efficiency, overhead)


def load_calibration(path: str | Path, accelerators: dict[str, Accelerator]) -> Calibration:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"calibration file {path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"calibration file {path} must hold a JSON object")
    for field in ("gpu", "model"):
        if not isinstance(raw.get(field), str):
            raise ValueError(f"calibration file {path}: field {field!r} (a name) is missing")
    if not any(raw.get(stage) for stage in STAGES):
        raise ValueError(
            f"calibration file {path} has no measurements: give 'attention', 'ffn' or "
            "'network' lists"
        )
    acc = find_accelerator(raw["gpu"], accelerators)
    model_ref = raw["model"]
    if (path.parent / model_ref / "config.json").is_file():  # a checkpoint beside the file
        model_ref = str(path.parent / model_ref)
    model = load_model(model_ref)
    kv_bytes = _number(raw, "kv_bytes_per_element", 1.0, path)
    nic = _number(raw, "network_gbps", acc.network_gbps, path) * 1e9 / 8
    default = Efficiency()
    fits = {}
    for stage in STAGES:
        points = raw.get(stage) or []
        if not isinstance(points, list):
            raise ValueError(f"calibration file {path}: {stage!r} must be a list of points")
        pairs = [_pair(stage, p, i, model, acc, kv_bytes, nic, path) for i, p in enumerate(points)]
        fits[stage] = fit(pairs, stage) if pairs else getattr(default, stage)
    counts = {stage: len(raw.get(stage) or []) for stage in STAGES}
    measured = ", ".join(f"{s} ({n})" for s, n in counts.items() if n)
    rest = "; the paper's fit for the rest" if not all(counts.values()) else ""
    source = f"{path.name}, measured: {measured}{rest}"
    efficiency = Efficiency(fits["attention"], fits["ffn"], fits["network"], source)
    return Calibration(acc.name, model.name, str(raw.get("source", "")), efficiency, counts)


def _pair(
    stage: str,
    point: Any,
    index: int,
    model: ModelShape,
    acc: Accelerator,
    kv_bytes: float,
    nic: float,
    path: Path,
) -> tuple[float, float]:
    """(roofline_s, measured_s) of one measurement."""
    where = f"calibration file {path}: {stage}[{index}]"
    if not isinstance(point, dict):
        raise ValueError(f"{where} must be an object")
    keys = {
        "attention": ("micro_batch", "context", "us"),
        "ffn": ("tokens", "ffn_gpus", "us"),
        "network": ("bytes", "us"),
    }[stage]
    missing = [k for k in keys if not _positive(point.get(k))]
    if missing:
        raise ValueError(f"{where} needs positive {', '.join(missing)}")
    measured = point["us"] * US
    if stage == "attention":
        return attention_roofline(
            model, acc, point["micro_batch"], point["context"], kv_bytes
        ), measured
    if stage == "network":
        return point["bytes"] / nic, measured
    layout = point.get("layout", SPLIT)
    if layout not in LAYOUTS:
        raise ValueError(f"{where}: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    moe = bool(point.get("moe", model.ffn.is_moe))
    if moe and not model.ffn.is_moe:
        raise ValueError(f"{where}: 'moe' is true but {model.name} has no MoE layers")
    if not isinstance(point["ffn_gpus"], int):
        raise ValueError(f"{where}: ffn_gpus must be an integer")
    return ffn_roofline(model, acc, point["tokens"], point["ffn_gpus"], layout, moe), measured


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and value > 0


def _number(raw: dict[str, Any], name: str, default: float, path: Path) -> float:
    value = raw.get(name, default)
    if not _positive(value):
        raise ValueError(f"calibration file {path}: {name!r} must be a positive number")
    return float(value)
