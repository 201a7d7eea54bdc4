"""Every Prometheus metric the services export, declared in one place.

Names are `afd_<service>_<quantity>_<unit>`; labels take a bounded set of values (an HTTP
status, a finish reason, a role, an expert id below the model's expert count, an instance
index). Each service builds its set on its own registry, so a process exports only its own,
and tests build as many as they like. docs/observability.md explains each metric; the
dashboards and alert rules under deploy/ read them by these names.

Latency buckets resolve the 50 ms TPOT SLA (STEP3.md): several boundaries either side of it.
This module knows nothing of torch or of the services' internals: they call in with numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib import metadata

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily

TOKEN_LATENCY_BUCKETS = (
    0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.045, 0.05,
    0.055, 0.06, 0.07, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
)  # fmt: skip
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.25, 0.5, 1.0, 2.5, 5.0)  # fmt: skip
STAGE_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0003, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025,
                 0.05, 0.1, 0.25, 1.0)  # fmt: skip  # one layer of one micro-batch
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# A step's wait on the control plane: none at all on busy steps, a queued RPC after idle ones.
CONTROL_WAIT_BUCKETS = (1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)

FINISH_REASONS = ("stop", "length", "abort", "error")
DIRECTIONS = ("a2f", "f2a")


DISTRIBUTION = "afd"  # the installed package whose version `afd_build_info` reports


def service_registry(role: str) -> CollectorRegistry:
    """A service's own registry, with what every Prometheus-instrumented process exports
    beside its own metrics (as the default registry would): the process's CPU, memory and
    file descriptors, the Python platform, the garbage collector; and `afd_build_info`, the
    running version and role, for dashboards that compare versions across a rollout."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    Info("afd_build", "The AFD release this process runs, and its role.", registry=registry).info(
        {"version": _version(), "role": role}
    )
    return registry


def _version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class GatewayMetrics:
    """What users see: per-request latencies, outcomes, tokens, the queue."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.ttft = Histogram(
            "afd_gateway_time_to_first_token_seconds",
            "Time from a choice's arrival to its first generated token.",
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "afd_gateway_time_per_output_token_seconds",
            "Per choice: (last token time - first token time) / (tokens - 1).",
            buckets=TOKEN_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "afd_gateway_inter_token_latency_seconds",
            "Time between successive streamed tokens of a choice, per token.",
            buckets=TOKEN_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "afd_gateway_e2e_request_latency_seconds",
            "Time from a choice's arrival to its last token.",
            buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_time = Histogram(
            "afd_gateway_queue_time_seconds",
            "Time a choice waited for a slot on an attention instance.",
            buckets=QUEUE_BUCKETS, registry=r,
        )  # fmt: skip
        self.http_requests = Counter(
            "afd_gateway_http_requests",
            "HTTP requests answered, by route and status code.",
            ["route", "status"], registry=r,
        )  # fmt: skip
        self.finished = Counter(
            "afd_gateway_requests",
            "Choices ended, by finish reason: stop, length, abort (client gone), error.",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "afd_gateway_prompt_tokens", "Prompt tokens of started choices.", registry=r
        )
        self.generation_tokens = Counter(
            "afd_gateway_generation_tokens", "Tokens generated and streamed back.", registry=r
        )
        self.tpot_sla_misses = Counter(
            "afd_gateway_tpot_sla_misses",
            "Choices whose time per output token exceeded the TPOT SLA.",
            registry=r,
        )
        self.tpot_sla = Gauge(
            "afd_gateway_tpot_sla_seconds", "The TPOT SLA the gateway admits by.", registry=r
        )
        self.running = Gauge(
            "afd_gateway_requests_running",
            "Choices running on attention instances.",
            registry=r,
        )
        self.waiting = Gauge(
            "afd_gateway_requests_waiting", "Choices queued for a slot.", registry=r
        )
        self.concurrency_limit = Gauge(
            "afd_gateway_concurrency_limit",
            "The adaptive cap on one attention instance's running choices.",
            ["attention"], registry=r,
        )  # fmt: skip
        for outcome in FINISH_REASONS:  # every series exists from the start, at zero
            self.finished.labels(outcome)


class DataPlaneBytes:
    """`afd_data_plane_bytes_total{direction, way}` of an AFD instance, read at each scrape
    from the counts its transfers keep (`read`: (direction, way) -> bytes), so the hot path
    adds to an integer instead of taking a metric's lock per message."""

    def __init__(
        self, registry: CollectorRegistry, read: Callable[[], dict[tuple[str, str], int]]
    ) -> None:
        self.read = read
        registry.register(self)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "afd_data_plane_bytes",
            "Bytes the data plane carried for this instance, by direction (a2f: attention to "
            "FFN, f2a: FFN to attention) and way (sent, received); step headers not counted.",
            labels=["direction", "way"],
        )
        for (direction, way), value in sorted(self.read().items()):
            family.add_metric([direction, way], value)
        yield family


class AttentionMetrics:
    """An attention instance: its engine, and (AFD) its side of the pipeline."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.kv_blocks_used = Gauge(
            "afd_attention_kv_blocks_used", "KV cache blocks held by sequences.", registry=r
        )
        self.kv_blocks_total = Gauge(
            "afd_attention_kv_blocks_total", "KV cache blocks in all.", registry=r
        )
        # The 0-1 fraction autoscalers and inference gateways read (vLLM's
        # kv_cache_usage_perc): held blocks over all of them.
        self.kv_cache_usage = Gauge(
            "afd_attention_kv_cache_usage_ratio",
            "Fraction of the KV cache held by sequences (0 to 1).",
            registry=r,
        )
        self.running = Gauge(
            "afd_attention_requests_running", "Sequences being computed.", registry=r
        )
        self.waiting = Gauge(
            "afd_attention_requests_waiting", "Sequences waiting to be scheduled.", registry=r
        )
        self.batch_sequences = Histogram(
            "afd_attention_batch_sequences",
            "Sequences in one engine step.",
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_tokens = Histogram(
            "afd_attention_batch_tokens",
            "Tokens computed in one engine step (prefill and decode).",
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.step_time = Histogram(
            "afd_attention_step_seconds",
            "Wall time of one engine step, scheduling to sampled tokens.",
            buckets=STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.control_wait = Histogram(
            "afd_attention_step_control_wait_seconds",
            "Time one step of a disaggregated instance spent on the control plane (its sizes "
            "travel with the data; only a step after an idle one tells the controller).",
            buckets=CONTROL_WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "afd_attention_prompt_tokens", "Prompt tokens admitted.", registry=r
        )
        self.generation_tokens = Counter(
            "afd_attention_generation_tokens", "Tokens generated.", registry=r
        )
        self.prefix_hit_tokens = Counter(
            "afd_attention_prefix_cache_hit_tokens",
            "Prompt tokens served from the prefix cache.",
            registry=r,
        )
        self.preemptions = Counter(
            "afd_attention_preemptions", "Sequences preempted for KV space.", registry=r
        )
        # AFD only: the attention side of the micro-batch pipeline.
        self.layer_attention_time = Histogram(
            "afd_attention_layer_seconds",
            "Attention-side compute of one layer for one micro-batch (sampled steps).",
            buckets=STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.ffn_wait = Histogram(
            "afd_attention_ffn_wait_seconds",
            "Per sampled step: time spent waiting for the FFN instances' partial outputs.",
            buckets=STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.transfer_wait = Histogram(
            "afd_attention_transfer_wait_seconds",
            "Per sampled step: time spent waiting for transfers to complete, by direction "
            "(a2f: sends to FFN; f2a: answers from FFN, the same as the FFN wait).",
            ["direction"], buckets=STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.bubble_ratio = Gauge(
            "afd_attention_pipeline_bubble_ratio",
            "Share of the last sampled step this instance spent waiting on the FFN side.",
            registry=r,
        )


class FFNMetrics:
    """An FFN instance's side of the pipeline."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.micro_batch_tokens = Histogram(
            "afd_ffn_micro_batch_tokens",
            "Tokens of one micro-batch, over every attention instance.",
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.layer_compute_time = Histogram(
            "afd_ffn_layer_seconds",
            "Feed-forward compute of one layer for one micro-batch (sampled steps).",
            buckets=STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.attention_wait = Histogram(
            "afd_ffn_attention_wait_seconds",
            "Per sampled step: time waiting for the slowest attention instance's activations.",
            buckets=STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.step_time = Histogram(
            "afd_ffn_step_seconds",
            "Wall time of one sampled step.",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.expert_tokens = Counter(
            "afd_ffn_expert_tokens",
            "Token assignments to each of this instance's experts (sampled steps, all layers).",
            ["expert"], registry=r,
        )  # fmt: skip


class ControllerMetrics:
    """The control plane: membership and the steps that wake an idle cluster."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.members = Gauge(
            "afd_controller_members",
            "Instances by role and state: missing (not registered), alive, silent (no heartbeat).",
            ["role", "state"], registry=r,
        )  # fmt: skip
        self.epoch = Gauge(
            "afd_controller_membership_epoch", "The current membership epoch.", registry=r
        )
        self.step_openings = Counter(
            "afd_controller_step_openings_total",
            "Steps opened after an idle one: the times the cluster woke up (busy steps never "
            "reach the controller).",
            registry=r,
        )


METRICS_LINE = "metrics on {host}:{port}"  # printed by each process; `afd serve` reads it


def add_metrics_argument(parser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="P",
        help="serve Prometheus metrics at http://HOST:P/metrics (0 picks a free port)",
    )


def serve_metrics(registry: CollectorRegistry, host: str, port: int | None) -> int | None:
    """Serve `registry` at http://host:port/metrics on a daemon thread and say where; `port`
    0 picks a free one, None serves nothing. Returns the port."""
    if port is None:
        return None
    server, _ = start_http_server(port, addr=host, registry=registry)
    print(METRICS_LINE.format(host=host, port=server.server_port), flush=True)
    return server.server_port


def sampler_for(device_type: str) -> StepSampler:
    """How often a step is timed in detail: a GPU step timed per stage synchronises the
    device at each boundary, so it is sampled more rarely there."""
    return StepSampler(64 if device_type == "cuda" else 8)


class StepSampler:
    """Every `every`-th step is timed in detail (per layer): often enough for histograms,
    rarely enough that the timing itself costs nothing measurable."""

    def __init__(self, every: int = 8) -> None:
        self.every = max(1, every)
        self._count = 0

    def next(self) -> bool:
        """Whether the step about to run is one to time."""
        self._count += 1
        return (self._count - 1) % self.every == 0
