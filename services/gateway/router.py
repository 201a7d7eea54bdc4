"""Which attention instance runs a request, and when: load polling, the admission queue.

A background task polls every instance's `GetLoad` (and so learns which are reachable).
`acquire` picks, among reachable instances under their concurrency limit, the one with the
most free KV blocks, then the fewest running requests; requests dispatched since the last
poll count against both, so a burst spreads out. With no room anywhere a request waits in
a FIFO queue of at most `max_queue`; past that it is refused with 429. Knows nothing of HTTP
bodies or tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from services.common.wire.attention import InstanceLoad
from services.common.wire.attention_aio import AsyncAttentionClient
from services.gateway.admission import ConcurrencyLimit, LimitConfig
from services.gateway.errors import queue_full, unavailable

log = logging.getLogger(__name__)

# A request's KV blocks before the next poll reports them: the attention default block size
# (16 tokens) over a short prompt. Only the order between instances depends on it.
BLOCKS_PER_NEW_REQUEST = 4
RETRY_AFTER_S = 1


@dataclass
class Instance:
    address: str
    client: AsyncAttentionClient
    limit: ConcurrencyLimit
    load: InstanceLoad | None = None  # None: not reachable at the last poll
    in_flight: int = 0  # requests this gateway runs on it now
    dispatched_since_poll: int = 0
    channel: grpc.aio.Channel | None = field(default=None, repr=False)

    def has_room(self) -> bool:
        load = self.load
        return load is not None and load.admitting and self.in_flight < self.limit.limit

    def score(self) -> tuple[int, int]:
        assert self.load is not None
        pending = self.dispatched_since_poll
        free = self.load.num_free_blocks - pending * BLOCKS_PER_NEW_REQUEST
        busy = self.load.num_running + self.load.num_waiting + pending
        return free, -max(busy, self.in_flight)


class Router:
    def __init__(
        self,
        addresses: list[str],
        limits: LimitConfig,
        max_queue: int,
        poll_interval_s: float = 0.05,
        secret: str | None = None,
    ) -> None:
        """`secret`: the cluster secret the attention instances require, if any."""
        if not addresses:
            raise ValueError("at least one attention instance (--attention HOST:PORT) is needed")
        self._addresses = addresses
        self._limits = limits
        self._max_queue = max_queue
        self._poll_interval_s = poll_interval_s
        self._secret = secret
        self.instances: list[Instance] = []
        self._waiters: deque[asyncio.Future[Instance]] = deque()
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for address in self._addresses:
            channel = grpc.aio.insecure_channel(address)
            self.instances.append(
                Instance(
                    address,
                    AsyncAttentionClient(channel, self._secret),
                    ConcurrencyLimit(self._limits, time.monotonic()),
                    channel=channel,
                )
            )
        await self.poll()
        self._poller = asyncio.create_task(self._poll_forever())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for instance in self.instances:
            if instance.channel is not None:
                await instance.channel.close()

    @property
    def num_waiting(self) -> int:
        return len(self._waiters)

    @property
    def num_running(self) -> int:
        return sum(i.in_flight for i in self.instances)

    @property
    def tpot_sla_s(self) -> float:
        return self._limits.tpot_sla_s

    async def poll(self) -> None:
        """Refresh every instance's load at once; an instance that does not answer within a
        second counts as unreachable until it does."""
        loads = await asyncio.gather(
            *(i.client.load(timeout_s=1.0) for i in self.instances), return_exceptions=True
        )
        for instance, load in zip(self.instances, loads, strict=True):
            if isinstance(load, BaseException):
                if instance.load is not None:
                    log.warning("attention instance %s unreachable: %s", instance.address, load)
                instance.load = None
            else:
                instance.load = load
            instance.dispatched_since_poll = 0
        self._wake()
        if not any(i.load is not None for i in self.instances):
            self._fail_waiters()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[Instance]:
        """An instance with room, held for the duration of the block."""
        instance = await self._acquire()
        try:
            yield instance
        finally:
            instance.in_flight -= 1
            self._wake()

    def suspect(self, instance: Instance) -> None:
        """`instance` refused or dropped a request as unavailable: send it nothing more
        until a poll finds it reachable and admitting again."""
        instance.load = None

    @property
    def num_instances(self) -> int:
        return len(self.instances)

    def record_tpot(self, instance: Instance, tpot_s: float) -> None:
        instance.limit.record(tpot_s, instance.in_flight, time.monotonic())
        self._wake()  # the limit may have grown

    async def _acquire(self) -> Instance:
        if not any(i.load is not None for i in self.instances):
            raise self._no_instance()
        if not self._waiters:
            instance = self._pick()
            if instance is not None:
                return self._take(instance)
        if len(self._waiters) >= self._max_queue:
            raise queue_full(RETRY_AFTER_S)
        waiter: asyncio.Future[Instance] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                waiter.result().in_flight -= 1  # handed a slot just as it was cancelled
                self._wake()
            raise

    def _pick(self) -> Instance | None:
        candidates = [i for i in self.instances if i.has_room()]
        return max(candidates, key=Instance.score) if candidates else None

    def _take(self, instance: Instance) -> Instance:
        instance.in_flight += 1
        instance.dispatched_since_poll += 1
        return instance

    def _wake(self) -> None:
        while self._waiters:
            instance = self._pick()
            if instance is None:
                return
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(self._take(instance))

    def _fail_waiters(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(self._no_instance())

    def _no_instance(self) -> Exception:
        return unavailable(
            "no attention instance is reachable ("
            + ", ".join(self._addresses)
            + "): start them, or check --attention"
        )

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                await self.poll()
            except Exception:  # a poll must never stop polling
                log.exception("polling the attention instances failed")
