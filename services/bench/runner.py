"""A benchmark: check the server, then run each load in turn and summarise each."""

from __future__ import annotations

from collections.abc import Iterator

import httpx

from services.bench.client import Target, send
from services.bench.load import Bounds, Load, RunResult, run_load
from services.bench.stats import SLA, Summary, summarize
from services.bench.workload import BenchRequest

SWEEP_KEYS = ("concurrency", "rate")


def parse_sweep(text: str, cap: int | None = None) -> list[Load]:
    """`concurrency=1,4,16` or `rate=0.5,1,2` (capped at `cap` in flight) as loads."""
    key, _, values = text.partition("=")
    if key not in SWEEP_KEYS or not values:
        raise ValueError(f"--sweep {text!r}: give concurrency=1,4,16 or rate=0.5,1,2")
    try:
        numbers = [float(v) for v in values.split(",")]
    except ValueError:
        raise ValueError(f"--sweep {text!r}: the values must be numbers") from None
    if key == "concurrency":
        if not all(n.is_integer() for n in numbers):
            raise ValueError(f"--sweep {text!r}: concurrencies are whole numbers")
        return [Load(concurrency=int(n)) for n in numbers]
    return [Load(concurrency=cap, rate=n) for n in numbers]


class ServerError(ValueError):
    """The server cannot be benchmarked as asked: unreachable, or without the model."""


async def check_server(client: httpx.AsyncClient, target: Target) -> None:
    url = target.base_url.rstrip("/") + "/v1/models"
    try:
        response = await client.get(url, headers=target.headers())
    except httpx.HTTPError as err:
        raise ServerError(f"cannot reach {url}: {err or type(err).__name__}") from None
    if response.status_code == 401:
        raise ServerError(f"{url} wants an API key: pass --api-key or set OPENAI_API_KEY")
    if response.status_code != 200:
        raise ServerError(f"{url} answered HTTP {response.status_code}: is it OpenAI-compatible?")
    try:
        served = [model["id"] for model in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise ServerError(f"{url} did not list models the OpenAI way") from None
    if target.model not in served:
        raise ServerError(f"{url} does not serve {target.model!r}; it serves {served}")


async def run_benchmark(
    target: Target,
    source: Iterator[BenchRequest],
    loads: list[Load],
    bounds: Bounds,
    sla: SLA,
    *,
    num_gpus: int | None = None,
    seed: int = 0,
    request_timeout_s: float = 600.0,
    progress: bool = True,
) -> list[tuple[Load, Summary, RunResult]]:
    # No pool limit: the load decides how many requests are in flight, not the client.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(request_timeout_s, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await check_server(client, target)
        points = []
        for i, load in enumerate(loads):
            # The warm-up is for the server's first requests, not for every point of a sweep.
            point_bounds = bounds if i == 0 else Bounds(bounds.num_requests, bounds.duration_s)
            run = await run_load(
                source,
                lambda request: send(client, target, request),
                load,
                point_bounds,
                seed=seed + i,
                progress=progress,
            )
            summary = summarize(run.results, run.duration_s, sla, num_gpus)
            points.append((load, summary, run))
        return points
