"""The throughput-versus-TPOT frontier of one or more bench results, as a PNG.

Each result file is one line (one configuration); each point is one load of its sweep,
labelled with it. The dashed vertical line is the TPOT SLA: the frontier left of it is what
the configuration can serve within the SLA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TPOT_STATS = ("p50", "p90", "p99", "mean")
SHORT = {"concurrency": "c", "rate": "r"}


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'afd[bench]'") from None


def _point_label(load: dict[str, Any]) -> str:
    return ",".join(f"{SHORT.get(k, k)}={v:g}" for k, v in load.items() if v is not None)


def plot_frontier(reports: list[dict[str, Any]], path: Path, tpot_stat: str = "p50") -> Path:
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here or on a server
    import matplotlib.pyplot as plt

    per_gpu = all(r["config"].get("num_gpus") for r in reports)
    y_key = "output_throughput_per_gpu" if per_gpu else "output_throughput"
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    top, right = 0.0, 0.0
    for report in reports:
        points = sorted(
            (p["summary"]["tpot_ms"][tpot_stat], p["summary"][y_key], _point_label(p["load"]))
            for p in report["points"]
            if p["summary"]["tpot_ms"][tpot_stat] is not None
        )
        if not points:
            continue
        xs, ys, _ = zip(*points, strict=True)
        top, right = max(top, *ys), max(right, *xs)
        ax.plot(xs, ys, marker="o", label=report["label"])
        for x, y, text in points:
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    slas = {p["summary"]["sla"]["tpot_ms"] for r in reports for p in r["points"]}
    for sla in sorted(slas):
        ax.axvline(sla, linestyle="--", color="tab:red", label=f"TPOT SLA {sla:g} ms")
        right = max(right, sla)
    ax.set_xlabel(f"TPOT {tpot_stat} (ms per output token)")
    ax.set_ylabel("output tokens/s" + (" per GPU" if per_gpu else ""))
    ax.set_xlim(0, 1.12 * right or 1)  # room for the point labels
    ax.set_ylim(0, 1.12 * top or 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Throughput against time per output token")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
