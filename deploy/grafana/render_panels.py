"""Draw the dashboards' key panels from a real Prometheus, as an operator would see them.

Starts `afd serve` (the tiny model: 1 attention, 2 FFN instances, on CPU) and a Prometheus
scraping every process each second with the alert rules loaded, drives a rising load with
`afd bench` (a concurrency sweep), then asks Prometheus for the panels' queries over the run
(`query_range`, a 15 s rate window for Grafana's `$__rate_interval`) and draws them with
matplotlib into docs/observability/*.png. It reuses the tests' Prometheus runner
(tests/support/prometheus.py), which `make prometheus` provides the binary for.

A script, not a test: `.venv/bin/python deploy/grafana/render_panels.py` (about 3 minutes).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.support.prometheus import Prometheus  # noqa: E402

OUT = ROOT / "docs" / "observability"
RULES = ROOT / "deploy" / "prometheus" / "afd-alerts.yml"
WINDOW = "15s"
SWEEP = "concurrency=1,2,4,8,16"

# (title, unit, [(expr, legend)]) per panel, as on the dashboards with a short window.
Q = "histogram_quantile({q}, sum by (le) (rate({m}_bucket[{w}])))"
PANELS = {
    "sla-overview": [
        ("Time per output token, against the SLA", "s", [
            (Q.format(q=q, m="afd_gateway_time_per_output_token_seconds", w=WINDOW), f"p{p}")
            for q, p in ((0.5, 50), (0.9, 90), (0.99, 99))
        ] + [("max(afd_gateway_tpot_sla_seconds)", "SLA")]),
        ("Time to first token", "s", [
            (Q.format(q=q, m="afd_gateway_time_to_first_token_seconds", w=WINDOW), f"p{p}")
            for q, p in ((0.5, 50), (0.9, 90), (0.99, 99))
        ]),
        ("Output tokens per second", "tokens/s", [
            (f"sum(rate(afd_gateway_generation_tokens_total[{WINDOW}]))", "all"),
            (f"sum(rate(afd_gateway_generation_tokens_total[{WINDOW}])) / "
             'count(up{component=~"attention|ffn"} == 1)', "per GPU"),
        ]),
        ("Share of requests missing the TPOT SLA", "ratio", [
            (f"sum(rate(afd_gateway_tpot_sla_misses_total[{WINDOW}])) / clamp_min(sum(rate("
             f'afd_gateway_requests_total{{outcome=~"stop|length"}}[{WINDOW}])), 1e-9)', "missed"),
        ]),
    ],
    "pipeline": [
        ("Per layer and micro-batch: attention vs FFN (median)", "s", [
            (Q.format(q=0.5, m="afd_attention_layer_seconds", w="30s"), "attention"),
            (Q.format(q=0.5, m="afd_ffn_layer_seconds", w="30s"), "FFN"),
        ]),
        ("Per step: time waiting on each direction", "s", [
            ("sum by (direction) (rate(afd_attention_transfer_wait_seconds_sum[30s])) / "
             "sum by (direction) (rate(afd_attention_transfer_wait_seconds_count[30s]))",
             "{direction}"),
        ]),
        ("Pipeline bubble ratio", "ratio", [
            ("afd_attention_pipeline_bubble_ratio", "attention {index}"),
        ]),
        ("FFN micro-batch size (mean tokens)", "tokens", [
            (f"sum by (index) (rate(afd_ffn_micro_batch_tokens_sum[{WINDOW}])) / "
             f"sum by (index) (rate(afd_ffn_micro_batch_tokens_count[{WINDOW}]))", "FFN {index}"),
        ]),
    ],
    "capacity": [
        ("KV cache used", "ratio", [
            ("afd_attention_kv_blocks_used / afd_attention_kv_blocks_total", "attention {index}"),
        ]),
        ("Requests running and queued at the gateway", "requests", [
            ("sum(afd_gateway_requests_running)", "running"),
            ("sum(afd_gateway_requests_waiting)", "queued"),
        ]),
        ("Sequences per engine step (mean)", "sequences", [
            (f"sum by (index) (rate(afd_attention_batch_sequences_sum[{WINDOW}])) / "
             f"sum by (index) (rate(afd_attention_batch_sequences_count[{WINDOW}]))",
             "attention {index}"),
        ]),
        ("Admission limit per attention instance", "requests", [
            ("afd_gateway_concurrency_limit", "{attention}"),
        ]),
    ],
}  # fmt: skip


def start_stack(work: Path) -> tuple[subprocess.Popen, str, Path]:
    model = work / "tiny"
    cli = [sys.executable, "-m", "services.cli"]
    subprocess.run([*cli, "init-checkpoint", str(model), "--preset", "tiny"], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)  # fmt: skip
    targets = work / "targets.json"
    serve = subprocess.Popen(
        [*cli, "serve", "--model", str(model), "--attention-instances", "1",
         "--ffn-instances", "2", "--port", "0", "--prometheus-targets", str(targets)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    for line in serve.stdout:
        if "gateway serving on " in line:
            url = line.split(" on ", 1)[1].strip()
            break
    else:
        sys.exit("afd serve did not start")
    while not targets.exists():
        time.sleep(0.1)
    return serve, url, model


def query_range(prometheus: Prometheus, expr: str, start: float, end: float) -> list[dict]:
    answer = httpx.get(f"{prometheus.url}/api/v1/query_range",
                       params={"query": expr, "start": start, "end": end, "step": "2s"},
                       timeout=30.0).json()  # fmt: skip
    if answer.get("status") != "success":
        raise ValueError(f"{expr}: {answer.get('error')}")
    return answer["data"]["result"]


def draw(name: str, panels, prometheus: Prometheus, start: float, end: float) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(13, 7.5))
    for ax, (title, unit, targets) in zip(axes.flat, panels, strict=True):
        for expr, legend in targets:
            for series in query_range(prometheus, expr, start, end):
                points = [(float(t) - start, float(v)) for t, v in series["values"]
                          if v not in ("NaN", "+Inf", "-Inf")]  # fmt: skip
                if points:
                    xs, ys = zip(*points, strict=True)
                    label = legend.format(**series["metric"])
                    style = "--" if label == "SLA" else "-"
                    ax.plot(xs, ys, style, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds into the run")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"AFD / {name} (tiny model on CPU, load {SWEEP}, scraped every second)")
    fig.tight_layout()
    path = OUT / f"{name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        serve, url, model = start_stack(work)
        prometheus = Prometheus(work, work / "targets.json", rules=(RULES,))
        try:
            prometheus.wait_for("sum(up)", lambda v: v == 5)
            start = time.time()
            subprocess.run(
                [sys.executable, "-m", "services.cli", "bench", "--url", url, "--model", "tiny",
                 "--tokenizer", str(model), "--sweep", SWEEP, "--num-requests", "24",
                 "--input-len", "64", "--output-len", "48", "--output-dir", str(work / "bench")],
                cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(5)  # the last scrapes
            end = time.time()
            for name, panels in PANELS.items():
                print(f"wrote {draw(name, panels, prometheus, start, end)}")
        finally:
            prometheus.stop()
            serve.terminate()
            serve.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
