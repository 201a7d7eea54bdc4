"""The load: how many requests are in flight, or how fast they arrive, and for how long.

Closed loop (`concurrency=C`): C requests are always in flight; a new one starts as soon as
one ends. Open loop (`rate=R`): requests arrive as a Poisson process of R per second whether
or not earlier ones have finished (with `concurrency` too, at most C in flight). A run stops
sending after `num_requests` or `duration_s`, whichever comes first, and waits for what is in
flight. Warm-up requests go first, at the same load, and are not measured.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass

from tqdm import tqdm

from services.bench.client import RequestResult
from services.bench.workload import BenchRequest

Send = Callable[[BenchRequest], Awaitable[RequestResult]]


@dataclass(frozen=True)
class Load:
    concurrency: int | None = None  # at most this many requests in flight
    rate: float | None = None  # Poisson arrivals per second

    def __post_init__(self) -> None:
        if self.concurrency is None and self.rate is None:
            raise ValueError("a load needs a concurrency or a request rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"the request rate must be a positive number, got {self.rate}")

    def label(self) -> str:
        return ",".join(f"{k}={v:g}" for k, v in asdict(self).items() if v is not None)


@dataclass(frozen=True)
class Bounds:
    num_requests: int | None = 100
    duration_s: float | None = None
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("a run needs a bound: a number of requests or a duration")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"the number of requests must be at least 1, got {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"the duration must be positive, got {self.duration_s}")
        if self.warmup < 0:
            raise ValueError(f"warm-up requests cannot be negative, got {self.warmup}")


@dataclass
class RunResult:
    results: list[RequestResult]  # measured requests, in the order they finished
    started: float  # perf_counter seconds when sending began
    duration_s: float  # from then to the last request's end


async def run_load(
    source: Iterator[BenchRequest],
    send: Send,
    load: Load,
    bounds: Bounds,
    seed: int = 0,
    progress: bool = True,
) -> RunResult:
    if bounds.warmup:
        warm = [next(source) for _ in range(bounds.warmup)]
        limit = asyncio.Semaphore(load.concurrency or bounds.warmup)
        await asyncio.gather(*(_limited(limit, send, r) for r in warm))
    rng = random.Random(seed)
    limit = asyncio.Semaphore(load.concurrency) if load.concurrency else None
    results: list[RequestResult] = []
    bar = tqdm(total=bounds.num_requests, desc=load.label(), unit="req", disable=not progress)

    async def one(request: BenchRequest) -> None:
        try:
            results.append(await send(request))
            bar.update()
        finally:
            if limit:
                limit.release()

    tasks = []
    start = time.perf_counter()
    deadline = start + (bounds.duration_s or math.inf)
    arrival = start
    while bounds.num_requests is None or len(tasks) < bounds.num_requests:
        if load.rate:
            arrival += rng.expovariate(load.rate)
            await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
        if limit:
            await limit.acquire()
        if time.perf_counter() >= deadline:
            if limit:
                limit.release()
            break
        tasks.append(asyncio.create_task(one(next(source))))
    await asyncio.gather(*tasks)
    bar.close()
    end = max((r.end for r in results), default=start)
    return RunResult(results, start, end - start)


async def _limited(limit: asyncio.Semaphore, send: Send, request: BenchRequest) -> None:
    async with limit:
        await send(request)
