"""`afd bench`'s statistics: known timings give known percentiles, TPOT, ITL and goodput."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from services.bench.client import RequestResult
from services.bench.stats import SLA, percentile, summarize


def request(ttft: float, tpot: float, tokens: int, start: float = 0.0) -> RequestResult:
    """A request sent at `start` whose tokens arrive every `tpot` s after the first."""
    times = [start + ttft + i * tpot for i in range(tokens)]
    return RequestResult(
        start, times[-1] + 0.001, times, prompt_tokens=10, output_tokens=tokens,
        target_output_len=tokens,
    )  # fmt: skip


def failed(error: str) -> RequestResult:
    return RequestResult(0.0, 0.5, [], error=error, target_output_len=8)


def test_percentiles_interpolate_between_ranks_as_numpy_does():
    assert percentile(list(range(1, 12)), 50) == 6
    assert percentile(list(range(1, 12)), 90) == 10
    assert percentile([10.0, 20.0], 99) == pytest.approx(19.9)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    values = [random.Random(3).expovariate(1.0) for _ in range(997)]
    for q in (50, 90, 99):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_ten_requests_of_known_timings():
    # Request i: TTFT (i + 1) * 100 ms, TPOT (i + 1) * 10 ms, 11 tokens, so 10 gaps.
    results = [request((i + 1) * 0.1, (i + 1) * 0.01, 11) for i in range(10)]
    s = summarize(results, duration_s=10.0, sla=SLA(ttft_ms=350, tpot_ms=25))

    assert (s.completed, s.failed, s.output_tokens, s.input_tokens) == (10, 0, 110, 100)
    assert s.ttft_ms.p50 == pytest.approx(550) and s.ttft_ms.p90 == pytest.approx(910)
    assert s.tpot_ms.mean == pytest.approx(55) and s.tpot_ms.p99 == pytest.approx(99.1)
    # ITL pools the 100 gaps: ten of each TPOT, so its median sits between 50 and 60 ms.
    assert s.itl_ms.count == 100 and s.itl_ms.p50 == pytest.approx(55)
    assert s.e2e_ms.p50 == pytest.approx(550 + 550 + 1)
    assert s.output_throughput == pytest.approx(11.0) and s.request_throughput == 1.0
    # Requests 0 and 1 meet both SLAs; request 2 meets TTFT (300 ms) but not TPOT (30 ms).
    assert s.good_requests == 2 and s.goodput == pytest.approx(2.2)


def test_goodput_needs_both_slas():
    fast_start_slow_decode = request(0.05, 0.2, 5)
    slow_start_fast_decode = request(3.0, 0.01, 5)
    both = request(0.05, 0.01, 5)
    s = summarize([fast_start_slow_decode, slow_start_fast_decode, both], 1.0, SLA(2000, 50))
    assert s.good_requests == 1 and s.goodput == 5.0 and s.output_throughput == 15.0


def test_one_token_requests_have_no_tpot_and_meet_the_tpot_sla():
    s = summarize([request(0.1, 0.0, 1), request(0.1, 0.02, 3)], 2.0, SLA(1000, 50))
    assert s.tpot_ms.count == 1 and s.tpot_ms.p50 == pytest.approx(20)
    assert s.good_requests == 2


def test_failures_are_counted_by_message_and_kept_out_of_the_latencies():
    results = [request(0.1, 0.01, 4), failed("HTTP 400: too long"), failed("HTTP 400: too long")]
    results.append(failed("ReadTimeout"))
    s = summarize(results, 1.0, SLA(1000, 50))
    assert (s.completed, s.failed) == (1, 3)
    assert s.errors == {"HTTP 400: too long": 2, "ReadTimeout": 1}
    assert s.ttft_ms.count == 1 and s.e2e_ms.p99 == pytest.approx(131)
    assert s.output_tokens == 4 and s.goodput == 4.0


def test_a_stream_that_fails_midway_is_a_failure():
    broken = request(0.1, 0.01, 4)
    broken.error = "the server closed the stream"
    s = summarize([broken], 1.0, SLA(1000, 50))
    assert (s.completed, s.failed, s.output_tokens) == (0, 1, 0)
    assert math.isnan(s.ttft_ms.p50)


def test_short_outputs_and_per_gpu_figures():
    short = request(0.1, 0.01, 3)
    short.target_output_len = 8  # an EOS ended it early
    s = summarize([short, request(0.1, 0.01, 8)], 2.0, SLA(1000, 50), num_gpus=4)
    assert s.short_outputs == 1
    assert s.output_throughput == 5.5 and s.output_throughput_per_gpu == pytest.approx(1.375)
    assert s.goodput_per_gpu == pytest.approx(1.375)
    assert summarize([short], 2.0, SLA(1000, 50)).output_throughput_per_gpu is None
