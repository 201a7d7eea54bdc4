"""`afd bench`'s load shapes, driven with an in-process sender that takes a set time (the
HTTP side is tested end to end in tests/e2e/test_bench.py): in-flight counts, bounds,
warm-up and Poisson arrivals."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from services.bench.client import RequestResult
from services.bench.load import Bounds, Load, run_load
from services.bench.runner import parse_sweep
from services.bench.workload import BenchRequest


class Sender:
    """Takes `seconds` per request and records what was in flight when."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.in_flight = 0
        self.most_in_flight = 0
        self.sent: list[tuple[float, str]] = []

    async def __call__(self, request: BenchRequest) -> RequestResult:
        start = time.perf_counter()
        self.sent.append((start, request.prompt))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(self.seconds)
        self.in_flight -= 1
        end = time.perf_counter()
        return RequestResult(start, end, [end], output_tokens=1, target_output_len=1)


def numbered():
    return (BenchRequest(f"prompt {i}", 1, 1) for i in itertools.count())


def run(sender, load, bounds, **kwargs):
    return asyncio.run(run_load(numbered(), sender, load, bounds, progress=False, **kwargs))


def test_concurrency_keeps_exactly_c_in_flight():
    sender = Sender(0.02)
    result = run(sender, Load(concurrency=4), Bounds(num_requests=40))
    assert len(result.results) == 40 and sender.most_in_flight == 4
    # Closed loop: 40 requests of 20 ms, 4 at a time, take about 10 rounds.
    assert 0.2 <= result.duration_s < 2.0


def test_warmup_requests_go_first_and_are_not_measured():
    sender = Sender(0.001)
    result = run(sender, Load(concurrency=2), Bounds(num_requests=5, warmup=3))
    assert [prompt for _, prompt in sender.sent[:3]] == ["prompt 0", "prompt 1", "prompt 2"]
    assert len(sender.sent) == 8 and len(result.results) == 5
    assert min(r.start for r in result.results) >= max(t for t, _ in sender.sent[:3])


def test_a_duration_stops_sending_and_waits_for_what_is_in_flight():
    sender = Sender(0.05)
    result = run(sender, Load(concurrency=2), Bounds(num_requests=None, duration_s=0.3))
    assert 4 <= len(result.results) <= 14  # about 0.3 s / 0.05 s * 2, on a busy machine fewer
    assert sender.in_flight == 0 and len(result.results) == len(sender.sent)


def test_poisson_arrivals_average_the_rate_and_do_not_wait_for_answers():
    sender = Sender(0.2)  # far slower than the arrivals: an open loop does not care
    result = run(sender, Load(rate=200.0), Bounds(num_requests=200), seed=7)
    starts = sorted(t for t, _ in sender.sent)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 200, rel=0.3)
    assert sender.most_in_flight > 10 and len(result.results) == 200
    # Exponential gaps vary: their spread is about their mean, unlike a fixed interval.
    mean = sum(gaps) / len(gaps)
    spread = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert spread > 0.5 * mean


def test_a_rate_with_a_concurrency_cap_never_exceeds_the_cap():
    sender = Sender(0.05)
    run(sender, Load(concurrency=3, rate=500.0), Bounds(num_requests=30))
    assert sender.most_in_flight == 3


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Load(), "needs a concurrency or a request rate"),
        (lambda: Load(concurrency=0), "at least 1"),
        (lambda: Load(rate=-1.0), "positive"),
        (lambda: Load(rate=float("inf")), "positive"),
        (lambda: Bounds(num_requests=None), "needs a bound"),
        (lambda: Bounds(num_requests=0), "at least 1"),
        (lambda: Bounds(duration_s=0), "positive"),
        (lambda: Bounds(warmup=-1), "cannot be negative"),
    ],
)
def test_impossible_loads_and_bounds_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_sweep_is_a_list_of_loads():
    assert parse_sweep("concurrency=1,4,16") == [Load(1), Load(4), Load(16)]
    assert parse_sweep("rate=0.5,2", cap=8) == [Load(8, 0.5), Load(8, 2.0)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("threads=1,2", "give concurrency=1,4,16 or rate="),
        ("concurrency=", "give concurrency=1,4,16 or rate="),
        ("rate=fast", "must be numbers"),
        ("concurrency=1.5", "whole numbers"),
        ("concurrency=nan", "whole numbers"),
        ("concurrency=0,2", "at least 1"),
        ("rate=0", "positive"),
    ],
)
def test_a_bad_sweep_says_what_to_write(text, message):
    with pytest.raises(ValueError, match=message):
        parse_sweep(text)
