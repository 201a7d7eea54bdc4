"""What a run measured: latency distributions, throughput and goodput.

The definitions, which users often confuse (`DEFINITIONS` is written into every report):
- TTFT, time to first token: from sending the request to its first content chunk.
- TPOT, time per output token, one value per request: (time of the last token - time of the
  first) / (output tokens - 1). The prefill is excluded; it is what a TPOT SLA bounds.
- ITL, inter-token latency, one value per streamed chunk: the gap between consecutive content
  chunks of a request, pooled over all requests. A chunk carries one token, except that a
  server holds back a token that ends inside a UTF-8 character and sends it with the next
  (vLLM's and SGLang's benchmarks count ITL the same way). Its tail shows the stalls (a
  prefill batched in, a slow step) that a per-request TPOT averages away.
- E2E latency: from sending the request to the end of its stream.
- Goodput: output tokens per second counting only requests that met both the TTFT and the
  TPOT SLA (and succeeded).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from services.bench.client import RequestResult

PERCENTILES = (50, 90, 99)

DEFINITIONS = {
    "ttft": "time to first token: request sent -> first content chunk",
    "tpot": "time per output token, per request: (last token - first token) / (tokens - 1)",
    "itl": "inter-token latency, per streamed chunk (normally one token): gap between "
    "consecutive chunks, all requests pooled",
    "e2e": "end-to-end latency: request sent -> end of its stream",
    "goodput": "output tokens/s from successful requests with TTFT <= SLA and TPOT <= SLA",
}


@dataclass(frozen=True)
class SLA:
    ttft_ms: float
    tpot_ms: float

    def met_by(self, result: RequestResult) -> bool:
        if not result.ok or ttft(result) * 1e3 > self.ttft_ms:
            return False
        per_token = tpot(result)
        return per_token is None or per_token * 1e3 <= self.tpot_ms


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Distribution:
    """In milliseconds; NaN where there were no values."""

    mean: float
    p50: float
    p90: float
    p99: float
    count: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Distribution:
        ms = [s * 1e3 for s in seconds]
        mean = sum(ms) / len(ms) if ms else math.nan
        return cls(mean, *(percentile(ms, q) for q in PERCENTILES), len(ms))


def ttft(result: RequestResult) -> float:
    return result.chunk_times[0] - result.start


def tpot(result: RequestResult) -> float | None:
    """None for a request of one token: it has no decode time."""
    if result.output_tokens < 2:
        return None
    return (result.chunk_times[-1] - result.chunk_times[0]) / (result.output_tokens - 1)


def itls(result: RequestResult) -> list[float]:
    times = result.chunk_times
    return [b - a for a, b in zip(times, times[1:], strict=False)]


@dataclass(frozen=True)
class Summary:
    completed: int
    failed: int
    errors: dict[str, int]  # message -> how many requests ended with it
    duration_s: float
    input_tokens: int
    output_tokens: int
    short_outputs: int  # completed with fewer tokens than asked (an EOS that was not ignored)
    request_throughput: float  # requests/s
    output_throughput: float  # tokens/s
    goodput: float  # tokens/s from requests within the SLA
    good_requests: int
    num_gpus: int | None
    output_throughput_per_gpu: float | None
    goodput_per_gpu: float | None
    sla: SLA
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2e_ms: Distribution

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(
    results: Sequence[RequestResult], duration_s: float, sla: SLA, num_gpus: int | None = None
) -> Summary:
    done = [r for r in results if r.ok]
    good = [r for r in done if sla.met_by(r)]
    output_tokens = sum(r.output_tokens for r in done)
    good_tokens = sum(r.output_tokens for r in good)
    per_second = 1 / duration_s if duration_s > 0 else math.nan
    per_gpu = (lambda x: x / num_gpus) if num_gpus else (lambda x: None)
    return Summary(
        completed=len(done),
        failed=len(results) - len(done),
        errors=dict(Counter(r.error for r in results if not r.ok).most_common()),
        duration_s=duration_s,
        input_tokens=sum(r.prompt_tokens for r in done),
        output_tokens=output_tokens,
        short_outputs=sum(r.output_tokens < r.target_output_len for r in done),
        request_throughput=len(done) * per_second,
        output_throughput=output_tokens * per_second,
        goodput=good_tokens * per_second,
        good_requests=len(good),
        num_gpus=num_gpus,
        output_throughput_per_gpu=per_gpu(output_tokens * per_second),
        goodput_per_gpu=per_gpu(good_tokens * per_second),
        sla=sla,
        ttft_ms=Distribution.of([ttft(r) for r in done]),
        tpot_ms=Distribution.of([t for r in done if (t := tpot(r)) is not None]),
        itl_ms=Distribution.of([gap for r in done for gap in itls(r)]),
        e2e_ms=Distribution.of([r.end - r.start for r in done]),
    )
