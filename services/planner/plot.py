"""PNG figures for `afd plan`: cost per 1M tokens against context, and a plan's stage times
against the per-layer budget. matplotlib is imported only when a figure is asked for (it is in
the `bench` and `dev` extras); without it the command fails with one line saying so."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.planner.cost import cost_report
from services.planner.deploy import Plan
from services.planner.hardware import Accelerator
from services.planner.output import STAGE_LABELS
from services.planner.shapes import ModelShape

CONTEXTS = tuple(2**k for k in range(10, 18))  # 1K .. 128K


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ValueError(
            "--plot needs matplotlib, which is not installed: pip install 'afd[bench]'"
        ) from None
    matplotlib.use("Agg")  # files only: no display here or on a server
    import matplotlib.pyplot as plt

    return plt


def plot_costs(
    models: Sequence[ModelShape],
    accelerators: Sequence[Accelerator],
    path: Path,
    kv_bytes_per_element: float = 1.0,
) -> Path:
    """AFD cost (cheapest attention + cheapest FFN accelerator) against context, per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in models:
        costs = [
            cost_report(model, n, accelerators, kv_bytes_per_element).afd_cost for n in CONTEXTS
        ]
        ax.plot(CONTEXTS, costs, marker="o", label=model.name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(CONTEXTS, [f"{n // 1024}K" for n in CONTEXTS])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("AFD decoding cost, USD per 1M tokens")
    names = ", ".join(a.name for a in accelerators)
    ax.set_title(f"Decoding cost against context (accelerators: {names})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_stages(plan: Plan, path: Path) -> Path:
    """One layer's stage times of the chosen deployment, and the SLA's per-layer budget."""
    plt = _pyplot()
    times = {STAGE_LABELS[k]: v * 1e6 for k, v in plan.stages.as_dict().items()}
    budget = plan.stage_budget_s * 1e6
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bars = ax.bar(list(times), list(times.values()), color="#4878a8")
    for bar, us in zip(bars, times.values(), strict=True):
        ax.annotate(f"{us:.0f}", (bar.get_x() + bar.get_width() / 2, us), ha="center", va="bottom")
    ax.axhline(budget, color="#c44e52", linestyle="--", label=f"budget {budget:.0f} us")
    shape, cluster = plan.shape, plan.request.cluster
    ax.set_ylim(0, 1.15 * max(budget, *times.values()))
    ax.set_ylabel("us per layer and micro-batch")
    ax.set_title(
        f"{cluster.model.name} on {cluster.accelerator.name}, {cluster.context} context: "
        f"{shape.attention_instances}A{shape.ffn_instances}F, {plan.tokens_per_gpu_s:.0f} "
        "tokens/GPU/s",
        fontsize=10,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
