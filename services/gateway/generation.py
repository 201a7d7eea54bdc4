"""One API request's choices running on attention instances, their deltas merged in one
stream.

Each choice (a prompt, its sampling parameters) takes a slot from the router, starts on that
instance's session (one gRPC stream shared by all the gateway's requests there), reads the
engine outputs' text (services/common/text_stream.py: detokenising inline, microseconds a
token) and forwards the text deltas, timing them for the admission control's TPOT and the
metrics. A choice whose stop string matched ends at once and cancels its request on the
instance; `close()` cancels every choice still open. Either way the instance aborts the
request and frees its KV blocks. Knows nothing of HTTP or of the response formats.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from services.common.detokenizer import Decoder
from services.common.metrics import GatewayMetrics
from services.common.sampling_params import SamplingParams
from services.common.text_stream import TextDelta, TextStream
from services.gateway.errors import APIError, from_rpc_error
from services.gateway.router import Instance, Router

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One choice: what to generate from."""

    prompt_token_ids: Sequence[int]
    params: SamplingParams


@dataclass(frozen=True)
class ChoiceDelta:
    index: int
    delta: TextDelta


_DONE = object()


class Choices:
    """The deltas of every job, in arrival order; `next()` returns None once all finished."""

    def __init__(
        self,
        router: Router,
        request_id: str,
        jobs: Sequence[Job],
        tokenizer: Decoder,
        metrics: GatewayMetrics | None = None,
        arrival: float | None = None,
    ) -> None:
        """`tokenizer`: the model's, to read the generated text; `arrival`:
        `time.monotonic()` when the HTTP request came in (default: now), the start of every
        choice's TTFT and end-to-end latency."""
        self._router = router
        self._request_id = request_id
        self._tokenizer = tokenizer
        self._metrics = metrics
        self._arrival = time.monotonic() if arrival is None else arrival
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._run(i, job)) for i, job in enumerate(jobs)]
        self._num_open = len(jobs)

    async def next(self) -> ChoiceDelta | None:
        """The next delta of any choice; raises `APIError` when a choice is refused."""
        while self._num_open:
            item = await self._queue.get()
            if item is _DONE:
                self._num_open -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, ChoiceDelta)
            return item
        return None

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, index: int, job: Job) -> None:
        timing = ChoiceTiming(self._arrival, len(job.prompt_token_ids))
        try:
            for attempt in itertools.count(1):
                async with self._router.slot() as instance:
                    timing.started()
                    forwarded = [0]  # deltas handed to the client so far
                    try:
                        await self._stream(index, job, instance, timing, forwarded)
                        return
                    except grpc.RpcError as err:
                        # An instance that is unavailable before the choice streamed anything
                        # (it died, drains, or re-forms) costs the client nothing: run the
                        # choice on another one. After the first delta it cannot be redone.
                        again = attempt < self._router.num_instances and not forwarded[0]
                        if err.code() is not grpc.StatusCode.UNAVAILABLE or not again:
                            raise
                        self._router.suspect(instance)
                        log.info("retrying on another instance: %s", err.details())
        except APIError as err:
            timing.outcome = "error"
            await self._queue.put(err)
        except grpc.RpcError as err:
            timing.outcome = "error"
            await self._queue.put(from_rpc_error(err))
        finally:
            if self._metrics is not None:
                timing.record(self._metrics, self._router.tpot_sla_s)
            self._queue.put_nowait(_DONE)

    async def _stream(
        self, index: int, job: Job, instance: Instance, timing: ChoiceTiming, forwarded: list[int]
    ) -> None:
        request_id = f"{self._request_id}-{index}-{uuid.uuid4().hex[:8]}"
        text = TextStream(self._tokenizer, job.prompt_token_ids, job.params)
        stream = instance.client.generate_in_session(request_id, job.prompt_token_ids, job.params)
        last: float | None = None
        try:
            async for output in stream:
                now = time.monotonic()
                # The first output carries the prefill: TTFT, not TPOT.
                if last is not None and output.new_token_ids:
                    tpot = (now - last) / len(output.new_token_ids)
                    self._router.record_tpot(instance, tpot)
                last = now
                timing.tokens(len(output.new_token_ids), now)
                delta = text.add(output)
                if delta.finished:
                    timing.outcome = delta.finish_reason or "stop"
                forwarded[0] += 1
                await self._queue.put(ChoiceDelta(index, delta))
                if delta.finished and not output.finished:
                    return  # a stop string matched: closing the stream cancels the request
        finally:
            await stream.aclose()  # type: ignore[attr-defined]


class ChoiceTiming:
    """One choice's timestamps, turned into the gateway's metrics when it ends. A choice
    that ends without a finish reason (the client went away) counts as "abort"."""

    def __init__(self, arrival: float, num_prompt_tokens: int) -> None:
        self.arrival = arrival
        self.num_prompt_tokens = num_prompt_tokens
        self.start: float | None = None  # when it got a slot
        self.token_times: list[tuple[float, int]] = []  # (time, tokens) per delta with tokens
        self.outcome = "abort"

    def started(self) -> None:
        self.start = time.monotonic()

    def tokens(self, count: int, now: float) -> None:
        if count:
            self.token_times.append((now, count))

    def record(self, m: GatewayMetrics, tpot_sla_s: float) -> None:
        m.finished.labels(self.outcome).inc()
        if self.start is None:
            return  # refused or gone before a slot: no latency to speak of
        m.queue_time.observe(self.start - self.arrival)
        m.prompt_tokens.inc(self.num_prompt_tokens)
        if not self.token_times:
            return
        first, _ = self.token_times[0]
        last, _ = self.token_times[-1]
        total = sum(count for _, count in self.token_times)
        m.generation_tokens.inc(total)
        m.ttft.observe(first - self.arrival)
        m.e2e.observe(last - self.arrival)
        previous = first
        for when, count in self.token_times[1:]:
            for _ in range(count):
                m.itl.observe((when - previous) / count)
            previous = when
        if total > 1:
            tpot = (last - first) / (total - 1)
            m.tpot.observe(tpot)
            if tpot > tpot_sla_s:
                m.tpot_sla_misses.inc()
