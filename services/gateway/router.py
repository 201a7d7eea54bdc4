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
from collections.abc import AsyncIterator, Callable
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


InstanceListener = Callable[[Instance, bool], None]  # (instance, added: else removed)


class Router:
    def __init__(
        self,
        addresses: list[str],
        limits: LimitConfig,
        max_queue: int,
        poll_interval_s: float = 0.05,
        secret: str | None = None,
        on_instance: InstanceListener | None = None,
    ) -> None:
        """`addresses`: the attention instances, or none yet when they are discovered
        (`set_addresses`). `secret`: the cluster secret they require, if any.
        `on_instance`: told of each instance added or removed."""
        self._addresses = list(addresses)
        self._limits = limits
        self._max_queue = max_queue
        self._poll_interval_s = poll_interval_s
        self._secret = secret
        self.on_instance = on_instance
        self.discovered = not addresses  # the instances come from the cluster's membership
        self.instances: list[Instance] = []
        self._retired: list[Instance] = []  # removed, closed once their requests end
        self._waiters: deque[asyncio.Future[Instance]] = deque()
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        addresses, self._addresses = self._addresses, []
        await self.set_addresses(addresses)
        self._poller = asyncio.create_task(self._poll_forever())

    async def set_addresses(self, addresses: list[str]) -> None:
        """Route to these attention instances from now on: new ones are added (and polled
        at once); removed ones get no new requests, and their channels close when the
        requests they run have ended."""
        if addresses == self._addresses:
            return
        kept = [i for i in self.instances if i.address in addresses]
        removed = [i for i in self.instances if i.address not in addresses]
        added = [self._connect(a) for a in addresses if a not in self._addresses]
        self._addresses = list(addresses)
        self.instances = kept + added
        self._retired += removed
        for instance in removed:
            log.info("attention instance %s removed", instance.address)
            if self.on_instance is not None:
                self.on_instance(instance, False)
        for instance in added:
            log.info("attention instance %s added", instance.address)
            if self.on_instance is not None:
                self.on_instance(instance, True)
        await self.poll()

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for instance in self.instances + self._retired:
            if instance.channel is not None:
                await instance.channel.close()

    def _connect(self, address: str) -> Instance:
        channel = grpc.aio.insecure_channel(address)
        return Instance(
            address,
            AsyncAttentionClient(channel, self._secret),
            ConcurrencyLimit(self._limits, time.monotonic()),
            channel=channel,
        )

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
        instances = list(self.instances)  # `set_addresses` may change the list meanwhile
        loads = await asyncio.gather(
            *(i.client.load(timeout_s=1.0) for i in instances), return_exceptions=True
        )
        for instance, load in zip(instances, loads, strict=True):
            if isinstance(load, BaseException):
                if instance.load is not None:
                    log.warning("attention instance %s unreachable: %s", instance.address, load)
                instance.load = None
            else:
                instance.load = load
            instance.dispatched_since_poll = 0
        await self._close_retired()
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

    async def _close_retired(self) -> None:
        idle = [i for i in self._retired if i.in_flight == 0]
        self._retired = [i for i in self._retired if i.in_flight > 0]
        for instance in idle:
            if instance.channel is not None:
                await instance.channel.close()

    def _no_instance(self) -> Exception:
        if not self._addresses:
            return unavailable(
                "no attention instance is in the cluster yet: retry once it has formed"
            )
        if self.discovered:
            return unavailable(
                "no attention instance of the cluster is reachable ("
                + ", ".join(self._addresses)
                + "): they may be re-forming; retry in a few seconds"
            )
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
