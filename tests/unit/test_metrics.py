"""What the metrics say, from known inputs: a choice's timestamps into the gateway's
latencies, an engine's steps into the attention instance's counters, membership states,
step openings, sampling, and the target list `afd serve` writes for Prometheus."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from services.attention.builder import local_engine
from services.attention.engine import EngineConfig
from services.attention.monitor import EngineMonitor
from services.attention.scheduler import SchedulerConfig
from services.cli.local_cluster import Child
from services.cli.serve import metrics_targets
from services.common.cluster import Member, Membership
from services.common.cluster_config import ClusterConfig
from services.common.metrics import AttentionMetrics, GatewayMetrics, StepSampler, service_registry
from services.common.sampling_params import SamplingParams
from services.controller.membership import ClusterSpec, Registry
from services.controller.steps import StepDesk
from services.gateway.generation import ChoiceTiming


def sample(registry: CollectorRegistry, name: str, **labels) -> float | None:
    return registry.get_sample_value(name, labels)


def test_a_choices_timestamps_become_its_latencies():
    registry = CollectorRegistry()
    timing = ChoiceTiming(arrival=100.0, num_prompt_tokens=7)
    timing.start = 100.25  # got a slot
    for when, count in ((100.5, 1), (100.6, 1), (100.8, 2)):
        timing.tokens(count, when)
    timing.tokens(0, 100.9)  # a delta with no token (the finish) adds no latency
    timing.outcome = "length"
    timing.record(GatewayMetrics(registry), tpot_sla_s=0.05)
    assert sample(registry, "afd_gateway_queue_time_seconds_sum") == pytest.approx(0.25)
    assert sample(registry, "afd_gateway_time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert sample(registry, "afd_gateway_e2e_request_latency_seconds_sum") == pytest.approx(0.8)
    # 4 tokens over 0.3 s after the first: TPOT 0.1; ITL per token 0.1, 0.1, 0.1.
    assert sample(registry, "afd_gateway_time_per_output_token_seconds_sum") == pytest.approx(0.1)
    assert sample(registry, "afd_gateway_inter_token_latency_seconds_count") == 3
    assert sample(registry, "afd_gateway_inter_token_latency_seconds_sum") == pytest.approx(0.3)
    assert sample(registry, "afd_gateway_tpot_sla_misses_total") == 1  # 100 ms > 50 ms
    assert sample(registry, "afd_gateway_generation_tokens_total") == 4
    assert sample(registry, "afd_gateway_prompt_tokens_total") == 7
    assert sample(registry, "afd_gateway_requests_total", outcome="length") == 1
    # TPOT buckets resolve the SLA: 0.1 s lands above the 50 ms boundary.
    le = "afd_gateway_time_per_output_token_seconds_bucket"
    assert sample(registry, le, le="0.05") == 0 and sample(registry, le, le="0.1") == 1


def test_a_choice_refused_before_a_slot_counts_as_an_error_without_latencies():
    registry = CollectorRegistry()
    timing = ChoiceTiming(arrival=5.0, num_prompt_tokens=3)
    timing.outcome = "error"
    timing.record(GatewayMetrics(registry), tpot_sla_s=0.05)
    assert sample(registry, "afd_gateway_requests_total", outcome="error") == 1
    assert sample(registry, "afd_gateway_requests_total", outcome="stop") == 0  # exists at 0
    assert sample(registry, "afd_gateway_queue_time_seconds_count") == 0
    assert sample(registry, "afd_gateway_prompt_tokens_total") == 0


def test_a_one_token_answer_has_a_ttft_but_no_tpot():
    registry = CollectorRegistry()
    timing = ChoiceTiming(arrival=0.0, num_prompt_tokens=1)
    timing.start = 0.0
    timing.tokens(1, 0.3)
    timing.outcome = "stop"
    timing.record(GatewayMetrics(registry), tpot_sla_s=0.05)
    assert sample(registry, "afd_gateway_time_to_first_token_seconds_count") == 1
    assert sample(registry, "afd_gateway_time_per_output_token_seconds_count") == 0
    assert sample(registry, "afd_gateway_tpot_sla_misses_total") == 0


def test_the_engine_monitor_counts_what_the_engine_did(tiny_model_f64):
    config = EngineConfig(
        block_size=4, num_kv_blocks=64, max_model_len=256,
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32),
    )  # fmt: skip
    engine = local_engine(tiny_model_f64, config)
    registry = CollectorRegistry()
    monitor = EngineMonitor(engine, AttentionMetrics(registry))
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    engine.add_request("a", list(range(10, 30)), params)
    engine.add_request("b", list(range(40, 43)), params)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        monitor.after_step()
        steps += 1
        if steps == 1:  # mid-flight: both sequences hold blocks
            used = sample(registry, "afd_attention_kv_blocks_used")
            assert used > 0
            assert sample(registry, "afd_attention_kv_cache_usage_ratio") == used / 64
            assert sample(registry, "afd_attention_requests_running") == 2
    assert sample(registry, "afd_attention_generation_tokens_total") == 10
    assert sample(registry, "afd_attention_prompt_tokens_total") == 23
    assert sample(registry, "afd_attention_step_seconds_count") == steps
    assert sample(registry, "afd_attention_batch_tokens_sum") == 23 + 10 - 2  # last tokens unfed
    assert sample(registry, "afd_attention_kv_blocks_total") == 64
    assert sample(registry, "afd_attention_requests_running") == 0
    assert sample(registry, "afd_attention_kv_cache_usage_ratio") == 0


def test_a_service_registry_exports_the_process_and_the_build():
    """What every Prometheus-instrumented process exports besides its own metrics, and the
    version and role of the release, as vLLM-shaped tooling expects them."""
    registry = service_registry("ffn")
    samples = {s.name: s for m in registry.collect() for s in m.samples}
    assert sample(registry, "process_resident_memory_bytes") > 0
    assert {"python_info", "python_gc_collections_total", "process_cpu_seconds_total"} <= set(
        samples
    )
    build = samples["afd_build_info"]
    assert build.value == 1 and build.labels["role"] == "ffn" and build.labels["version"]


def test_members_are_missing_then_alive_then_silent():
    now = [0.0]
    spec = ClusterSpec(1, 2, ClusterConfig(), fingerprint="f" * 16)
    registry = Registry(spec, "store-host", 1234, clock=lambda: now[0])
    assert registry.count("ffn", "missing", 3.0) == 2
    registry.register("ffn", 0, "h:1", "f" * 16)
    assert [registry.count("ffn", s, 3.0) for s in ("missing", "alive", "silent")] == [1, 1, 0]
    now[0] = 10.0  # no heartbeat since
    assert [registry.count("ffn", s, 3.0) for s in ("missing", "alive", "silent")] == [1, 0, 1]
    assert registry.epoch == 0  # not formed yet


def test_a_step_opening_is_counted_once_however_many_instances_open_it():
    openings = []
    desk = StepDesk(on_open=lambda: openings.append(1))
    members = (Member("attention", 0, 0, "a:1"), Member("attention", 1, 1, "b:1"))
    ffn = Member("ffn", 0, 2, "f:1")
    desk.change(Membership(1, 3, "h", 1, ClusterConfig(), (*members, ffn)))
    desk.open(1, 0, 0)
    desk.open(1, 0, 1)  # the other attention instance woke for the same step
    assert len(openings) == 1
    desk.open(1, 5, 1)
    assert len(openings) == 2


def test_one_step_in_every_n_is_sampled():
    sampler = StepSampler(every=4)
    assert [sampler.next() for _ in range(9)] == [True, False, False, False] * 2 + [True]
    assert all(StepSampler(every=1).next() for _ in range(3))


def test_serve_lists_each_processs_metrics_endpoint_with_its_component(tmp_path):
    class Cluster:
        children = [
            Child("controller", None, [], metrics="h:1"),
            Child("attention instance 0", None, [], metrics="h:2"),
            Child("ffn instance 1", None, [], metrics="h:3"),
            Child("gateway", None, [], metrics=None),  # not serving metrics (yet): left out
        ]

    assert metrics_targets(Cluster()) == [
        {"targets": ["h:1"], "labels": {"component": "controller"}},
        {"targets": ["h:2"], "labels": {"component": "attention", "index": "0"}},
        {"targets": ["h:3"], "labels": {"component": "ffn", "index": "1"}},
    ]
