"""A real Prometheus scrapes every process of a local `afd serve` stack while it serves the
official `openai` client, and sees what happened: every target up, the tokens the client
received, the outcomes, the pipeline's stages, the experts' loads, the membership. Then
every dashboard panel's query and every alert rule goes to that Prometheus."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.support.cluster import Cluster, afd
from tests.support.dashboards import queries
from tests.support.prometheus import Prometheus

REQUESTS, MAX_TOKENS = 6, 16
ALERT_RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "afd-alerts.yml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prom") / "tiny"
    assert afd("init-checkpoint", str(path), "--preset", "tiny").wait() == 0
    return path


@pytest.fixture(scope="module")
def stack(checkpoint, tmp_path_factory):
    """The stack under load, and the Prometheus that watched it."""
    work = tmp_path_factory.mktemp("prometheus")
    targets = work / "targets.json"
    cluster = Cluster(
        "--model", str(checkpoint), "--attention-instances", "1", "--ffn-instances", "2",
        "--dtype", "float32", "--prometheus-targets", str(targets), gateway=True,
    )  # fmt: skip
    prometheus = None
    try:
        deadline = time.monotonic() + 30
        while not targets.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        prometheus = Prometheus(work, targets, rules=(ALERT_RULES,))
        # Every counter scraped at zero before the load, so rates see the whole of it.
        prometheus.wait_for("sum(up)", lambda v: v == 5)
        received = serve_load(cluster.gateway_url)
        # Until the scrapes after the load are in, each process's (a scrape may time out on a
        # busy machine, so the attention instance's can lag the gateway's).
        for counter in (
            "afd_gateway_generation_tokens_total",
            "afd_attention_generation_tokens_total",
        ):
            prometheus.wait_for(f"sum({counter})", lambda v: v == received, timeout_s=60)
        yield cluster, prometheus, received, json.loads(targets.read_text())
    finally:
        if prometheus is not None:
            prometheus.stop()
        cluster.stop()


def serve_load(url: str) -> int:
    """REQUESTS streamed completions of MAX_TOKENS and one request for an unknown model;
    returns the tokens the client received."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)

    def one(i: int) -> int:
        stream = client.completions.create(
            model="tiny", prompt=f"count {i}", max_tokens=MAX_TOKENS, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        return sum(chunk.usage.completion_tokens for chunk in stream if chunk.usage)

    with ThreadPoolExecutor(REQUESTS) as pool:
        received = sum(pool.map(one, range(REQUESTS)))
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    return received


def test_every_process_is_scraped_with_its_component(stack):
    _, prometheus, _, targets = stack
    # A scrape may time out (one second) on a busy machine: wait for every target's next.
    assert prometheus.wait_for("sum(up)", lambda v: v == 5) == 5
    up = prometheus.query("up")
    components = sorted(series["metric"].get("component", "") for series in up)
    assert components == ["attention", "controller", "ffn", "ffn", "gateway"]
    assert all(series["value"][1] == "1" for series in up)
    assert len(targets) == 5
    # Each says which release and role it runs, and exports its process's own metrics.
    roles = sorted(s["metric"]["role"] for s in prometheus.query("afd_build_info"))
    assert roles == ["attention", "controller", "ffn", "ffn", "gateway"]
    assert len(prometheus.query("process_resident_memory_bytes")) == 5


def test_the_gateway_counts_what_the_client_received(stack):
    _, prometheus, received, _ = stack
    assert received == REQUESTS * MAX_TOKENS
    assert prometheus.value('afd_gateway_requests_total{outcome="length"}') == REQUESTS
    assert prometheus.value("sum(afd_gateway_prompt_tokens_total)") > 0
    not_found = 'afd_gateway_http_requests_total{route="/v1/completions",status="404"}'
    assert prometheus.value(not_found) == 1
    ok = 'afd_gateway_http_requests_total{route="/v1/completions",status="200"}'
    assert prometheus.value(ok) == REQUESTS
    for name in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
        assert prometheus.value(f"afd_gateway_{name}_seconds_count") == REQUESTS
    assert prometheus.value("afd_gateway_inter_token_latency_seconds_count") == REQUESTS * (
        MAX_TOKENS - 1
    )
    p90 = "histogram_quantile(0.9, sum by (le) (afd_gateway_time_per_output_token_seconds_bucket))"
    assert 0 < prometheus.value(p90) < 10
    assert prometheus.value("afd_gateway_tpot_sla_seconds") == 0.05
    assert prometheus.value("afd_gateway_requests_running") == 0


def test_the_attention_instance_reports_its_engine_and_pipeline(stack):
    _, prometheus, received, _ = stack
    assert prometheus.value("afd_attention_generation_tokens_total") == received
    assert prometheus.value("afd_attention_kv_blocks_total") > 0
    assert prometheus.value("afd_attention_kv_blocks_used") == 0  # every request finished
    assert prometheus.value("afd_attention_kv_cache_usage_ratio") == 0
    assert prometheus.value("afd_attention_step_seconds_count") >= MAX_TOKENS
    # Sampled steps: every layer of every micro-batch timed, and what they waited for.
    assert prometheus.value("afd_attention_layer_seconds_count") > 0
    assert prometheus.value("afd_attention_ffn_wait_seconds_count") > 0
    directions = prometheus.query("afd_attention_transfer_wait_seconds_count")
    assert sorted(s["metric"]["direction"] for s in directions) == ["a2f", "f2a"]
    ratio = prometheus.value("afd_attention_pipeline_bubble_ratio")
    assert 0 <= ratio <= 1


def test_ffn_instances_report_their_stages_and_every_experts_load(stack):
    _, prometheus, _, _ = stack
    per_instance = prometheus.query("sum by (index) (afd_ffn_micro_batch_tokens_count)")
    assert sorted(s["metric"]["index"] for s in per_instance) == ["0", "1"]
    experts = prometheus.query("afd_ffn_expert_tokens_total")
    # The tiny model's 8 experts, 4 on each instance, each counted where it lives.
    assert sorted(int(s["metric"]["expert"]) for s in experts) == list(range(8))
    assert prometheus.value("sum(afd_ffn_expert_tokens_total)") > 0
    assert prometheus.value("sum(afd_ffn_layer_seconds_count)") > 0
    assert prometheus.value("sum(afd_ffn_attention_wait_seconds_count)") > 0


def test_the_controller_reports_membership_and_plan_latency(stack):
    _, prometheus, _, _ = stack
    alive = 'afd_controller_members{{role="{}",state="alive"}}'
    assert prometheus.value(alive.format("attention")) == 1
    assert prometheus.value(alive.format("ffn")) == 2
    assert prometheus.value('sum(afd_controller_members{state!="alive"})') == 0
    assert prometheus.value("afd_controller_membership_epoch") == 1
    assert prometheus.value("afd_controller_step_openings_total") >= 1  # the idle cluster woke


def test_every_dashboard_query_parses_and_has_data(stack):
    _, prometheus, _, _ = stack
    empty = []
    for dashboard, title, expr in queries():
        if not prometheus.query(expr):  # raises if Prometheus refuses the query
            empty.append(f"{dashboard} / {title}: {expr}")
    assert not empty, "queries with no data after the load:\n" + "\n".join(empty)


def test_the_alert_rules_load_and_stay_quiet_on_a_healthy_stack(stack):
    _, prometheus, _, _ = stack
    groups = prometheus.get("/api/v1/rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 11 and all(rule["health"] == "ok" for rule in rules), rules
    # What a CPU stack's speed decides, not its health: the TPOT SLO, and the pipeline's
    # bubbles (two FFN processes on a shared 2-core machine keep the attention side waiting
    # about half of each step, either side of the alert's threshold).
    speed = ("AFDTPOTSLO", "AFDPipelineBubbles")
    for rule in rules:
        if rule["type"] != "alerting":
            continue
        assert rule["state"] != "firing", rule["name"]
        if not rule["name"].startswith(speed):
            # Every instance up, alive, the cache empty, no queue.
            assert prometheus.query(rule["query"]) == [], rule["name"]
    # The SLO's recording rule: the share of this load's requests that missed the TPOT SLA
    # (on a busy CPU some or all of them, never a fixed number).
    missed = prometheus.value("afd_gateway_tpot_sla_misses_total")
    expected = missed / REQUESTS
    ratio = prometheus.wait_for(
        "afd:tpot_sla_miss_ratio:rate5m", lambda v: v is not None and abs(v - expected) < 1e-6
    )
    assert ratio == pytest.approx(expected, abs=1e-6) and 0 <= ratio <= 1
