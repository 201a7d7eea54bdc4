"""The Grafana dashboards, as code: `python deploy/grafana/build_dashboards.py` writes
deploy/grafana/dashboards/*.json (Grafana's dashboard JSON, schema 39), which the Helm chart
ships and Grafana imports. Edit here, regenerate, commit both; a test checks they agree and
sends every panel's query to a real Prometheus scraping a running stack.

Three dashboards:
- SLA overview: TTFT, TPOT (against the SLA line), ITL and end-to-end latency quantiles,
  goodput, tokens/s and tokens per GPU per second, errors;
- AFD pipeline: attention against FFN time per layer, the transfers' waits, bubbles, the
  FFN batch, the slowest instance, the experts' load;
- capacity: KV cache use, running and queued requests, the admission limit, membership.

Tokens per GPU assume one GPU per attention and FFN instance (the local and Helm defaults).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
RATE = "$__rate_interval"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def quantiles(metric: str, by: str = "", qs=(0.5, 0.9, 0.99)) -> list[tuple[str, str]]:
    """histogram_quantile targets of a histogram, one per quantile (and per `by` label)."""
    group = f"le, {by}" if by else "le"
    legend = f"p{{q}} {{{{{by}}}}}" if by else "p{q}"
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[{RATE}])))",
            legend.format(q=round(q * 100)),
        )
        for q in qs
    ]


def mean_per(metric: str, by: str) -> str:
    """The mean of a histogram's observations over the window, per `by` label."""
    return (
        f"sum by ({by}) (rate({metric}_sum[{RATE}])) / sum by ({by}) (rate({metric}_count[{RATE}]))"
    )


def panel(
    title: str,
    targets: list[tuple[str, str]],
    unit: str,
    kind: str = "timeseries",
    description: str = "",
) -> dict:
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                "datasource": DATASOURCE,
            }
            for i, (expr, legend) in enumerate(targets)
        ],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
    }


def dashboard(uid: str, title: str, description: str, panels: list[dict]) -> dict:
    for i, p in enumerate(panels):  # two panels a row, 8 high
        p["id"] = i + 1
        p["gridPos"] = {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)}
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["afd"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                }
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def sla_overview() -> dict:
    finished = 'afd_gateway_requests_total{outcome=~"stop|length"}'
    return dashboard(
        "afd-sla",
        "AFD / SLA overview",
        "What users get: latencies against the TPOT SLA, goodput, throughput, errors.",
        [
            panel("Time to first token", quantiles("afd_gateway_time_to_first_token_seconds"), "s"),
            panel(
                "Time per output token, against the SLA",
                [
                    *quantiles("afd_gateway_time_per_output_token_seconds"),
                    ("max(afd_gateway_tpot_sla_seconds)", "SLA"),
                ],
                "s",
                description="Per request: (last token - first token) / (tokens - 1).",
            ),
            panel("Inter-token latency", quantiles("afd_gateway_inter_token_latency_seconds"), "s"),
            panel(
                "End-to-end request latency",
                quantiles("afd_gateway_e2e_request_latency_seconds"),
                "s",
            ),
            panel(
                "Goodput: finished requests within the TPOT SLA",
                [
                    (
                        f"sum(rate({finished}[{RATE}])) - sum(rate("
                        f"afd_gateway_tpot_sla_misses_total[{RATE}]))",
                        "within SLA",
                    ),
                    (f"sum(rate({finished}[{RATE}]))", "finished"),
                ],
                "reqps",
            ),
            panel(
                "Share of requests missing the TPOT SLA",
                [
                    (
                        f"sum(rate(afd_gateway_tpot_sla_misses_total[{RATE}])) / "
                        f"clamp_min(sum(rate({finished}[{RATE}])), 1e-9)",
                        "missed",
                    )
                ],
                "percentunit",
            ),
            panel(
                "Output tokens per second",
                [
                    (f"sum(rate(afd_gateway_generation_tokens_total[{RATE}]))", "all GPUs"),
                    (f"sum(rate(afd_gateway_prompt_tokens_total[{RATE}]))", "prompt tokens"),
                ],
                "short",
            ),
            panel(
                "Output tokens per GPU per second",
                [
                    (
                        f"sum(rate(afd_gateway_generation_tokens_total[{RATE}])) / "
                        'count(up{component=~"attention|ffn"} == 1)',
                        "per GPU",
                    )
                ],
                "short",
                description="One GPU per attention and FFN instance.",
            ),
            panel(
                "Errors and aborts",
                [
                    (
                        "sum by (outcome) (rate(afd_gateway_requests_total"
                        f'{{outcome=~"error|abort"}}[{RATE}]))',
                        "{{outcome}}",
                    ),
                    (
                        f'sum by (status) (rate(afd_gateway_http_requests_total{{status=~"[45].."}}'
                        f"[{RATE}]))",
                        "HTTP {{status}}",
                    ),
                ],
                "reqps",
            ),
            panel("Queue time", quantiles("afd_gateway_queue_time_seconds"), "s"),
        ],
    )


def pipeline() -> dict:
    return dashboard(
        "afd-pipeline",
        "AFD / pipeline",
        "Attention against FFN against transfer, per layer and per step; where the bubbles are.",
        [
            panel(
                "Per layer and micro-batch: attention vs FFN compute (median)",
                [
                    (
                        "histogram_quantile(0.5, sum by (le) "
                        f"(rate(afd_attention_layer_seconds_bucket[{RATE}])))",
                        "attention",
                    ),
                    (
                        f"histogram_quantile(0.5, sum by (le) (rate(afd_ffn_layer_seconds_bucket"
                        f"[{RATE}])))",
                        "FFN",
                    ),
                ],
                "s",
                description="Sampled steps; each stage must fit the per-layer budget.",
            ),
            panel(
                "Per step: time waiting on each transfer direction",
                [
                    (mean_per("afd_attention_transfer_wait_seconds", "direction"), "{{direction}}"),
                    (
                        mean_per("afd_ffn_attention_wait_seconds", "index"),
                        "FFN {{index}} waiting for attention",
                    ),
                ],
                "s",
            ),
            panel(
                "Network's share of the step (attention waiting on transfers)",
                [
                    (
                        f"{mean_per('afd_attention_transfer_wait_seconds', 'direction')} / "
                        f"scalar({mean_per('afd_attention_step_seconds', '')})",
                        "{{direction}}",
                    )
                ],
                "percentunit",
                description="Mean wait per sampled step on each transfer direction over the mean "
                "step time: the part of a step the pipeline did not hide.",
            ),
            panel(
                "Data plane: bytes per second by direction (attention instances' view)",
                [
                    (
                        f"sum by (direction, way) (rate(afd_data_plane_bytes_total"
                        f'{{component="attention"}}[{RATE}]))',
                        "{{direction}} {{way}}",
                    )
                ],
                "Bps",
            ),
            panel(
                "Data plane: bytes sent to the FFN side per computed token (all layers)",
                [
                    (
                        f'sum(rate(afd_data_plane_bytes_total{{direction="a2f", way="sent", '
                        f'component="attention"}}[{RATE}])) / sum(rate('
                        f"afd_attention_batch_tokens_sum[{RATE}]))",
                        "A2F bytes / token",
                    )
                ],
                "bytes",
                description="Each token crosses every layer to every FFN instance: what FFN "
                "instances of several GPUs cut.",
            ),
            panel(
                "Pipeline bubble ratio (attention waiting on FFN)",
                [("afd_attention_pipeline_bubble_ratio", "attention {{index}}")],
                "percentunit",
            ),
            panel(
                "FFN micro-batch size (tokens)",
                [
                    *quantiles("afd_ffn_micro_batch_tokens", qs=(0.5, 0.9)),
                    (mean_per("afd_ffn_micro_batch_tokens", "index"), "mean, FFN {{index}}"),
                ],
                "short",
            ),
            panel(
                "Slowest FFN instances (p90 per layer)",
                [
                    (
                        f"topk(3, histogram_quantile(0.9, sum by (le, index) "
                        f"(rate(afd_ffn_layer_seconds_bucket[{RATE}]))))",
                        "FFN {{index}}",
                    )
                ],
                "s",
            ),
            panel(
                "Slowest attention instances (p90 per layer)",
                [
                    (
                        f"topk(3, histogram_quantile(0.9, sum by (le, index) "
                        f"(rate(afd_attention_layer_seconds_bucket[{RATE}]))))",
                        "attention {{index}}",
                    )
                ],
                "s",
            ),
            panel(
                "Expert load (token assignments per second)",
                [(f"sum by (expert) (rate(afd_ffn_expert_tokens_total[{RATE}]))", "{{expert}}")],
                "short",
                kind="barchart",
            ),
            panel(
                "Expert load imbalance (max / mean)",
                [
                    (
                        f"max(rate(afd_ffn_expert_tokens_total[{RATE}])) / "
                        f"clamp_min(avg(rate(afd_ffn_expert_tokens_total[{RATE}])), 1e-9)",
                        "max/mean",
                    )
                ],
                "short",
            ),
            panel("Engine step time (attention)", quantiles("afd_attention_step_seconds"), "s"),
            panel(
                "Idle-to-busy wake-ups (control plane; busy steps never reach it)",
                [("sum(rate(afd_controller_step_openings_total[$__rate_interval]))", "openings/s")],
                "short",
            ),
        ],
    )


def capacity() -> dict:
    return dashboard(
        "afd-capacity",
        "AFD / capacity",
        "KV cache, queue, running requests and admission, membership.",
        [
            panel(
                "KV cache used",
                [
                    (
                        "afd_attention_kv_blocks_used / afd_attention_kv_blocks_total",
                        "attention {{index}}",
                    )
                ],
                "percentunit",
            ),
            panel(
                "Requests running and queued at the gateway",
                [
                    ("sum(afd_gateway_requests_running)", "running"),
                    ("sum(afd_gateway_requests_waiting)", "queued"),
                ],
                "short",
            ),
            panel(
                "Sequences per attention instance",
                [
                    ("afd_attention_requests_running", "running {{index}}"),
                    ("afd_attention_requests_waiting", "waiting {{index}}"),
                ],
                "short",
            ),
            panel(
                "Admission limit per attention instance",
                [("afd_gateway_concurrency_limit", "{{attention}}")],
                "short",
            ),
            panel(
                "Sequences per engine step (mean)",
                [(mean_per("afd_attention_batch_sequences", "index"), "attention {{index}}")],
                "short",
            ),
            panel(
                "Prefix cache hits and preemptions",
                [
                    (
                        f"sum(rate(afd_attention_prefix_cache_hit_tokens_total[{RATE}])) / "
                        f"clamp_min(sum(rate(afd_attention_prompt_tokens_total[{RATE}])), 1e-9)",
                        "prompt tokens from cache",
                    ),
                    (f"sum(rate(afd_attention_preemptions_total[{RATE}]))", "preemptions/s"),
                ],
                "short",
            ),
            panel(
                "Members by role and state",
                [("afd_controller_members", "{{role}} {{state}}")],
                "short",
            ),
            panel(
                "Membership epoch",
                [("afd_controller_membership_epoch", "epoch")],
                "short",
                kind="stat",
            ),
        ],
    )


DASHBOARDS = {"afd-sla-overview": sla_overview, "afd-pipeline": pipeline, "afd-capacity": capacity}


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {
        f"{name}.json": json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()
    }


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
