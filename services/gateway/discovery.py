"""The attention instances to route to, found through the controller.

With `--controller` and no `--attention`, the gateway asks the controller for the cluster's
membership every `poll_s` and routes to its attention members: an instance added by scaling
is used once it is in a formed epoch; one that left (drained, scaled down, dead) gets no new
requests. While an epoch forms, the last formed membership stands. A controller that cannot
be reached changes nothing: the instances already known keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from services.common import cluster_secret
from services.common.cluster import ATTENTION
from services.common.wire import control as wire
from services.gateway.router import Router

log = logging.getLogger(__name__)

POLL_S = 1.0


class MembershipWatch:
    def __init__(
        self, controller: str, router: Router, secret: str | None, poll_s: float = POLL_S
    ) -> None:
        self.controller = controller
        self._router = router
        self._metadata = cluster_secret.metadata(secret)
        self._poll_s = poll_s
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None
        self._answered = False  # the controller has answered once

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.controller)
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._channel is not None:
            await self._channel.close()

    async def refresh(self) -> None:
        """Ask the controller once; route to the attention members of its newest formed
        membership."""
        assert self._channel is not None
        stub = wire.controller_stub(self._channel)
        try:
            response = await stub.GetMembership(
                wire.get_membership_request(), timeout=self._poll_s, metadata=self._metadata
            )
        except grpc.RpcError as err:
            if self._answered:
                log.warning("the controller %s did not answer: %s", self.controller, err.code())
            return
        self._answered = True
        membership = wire.get_membership_result(response).membership
        if membership is None:
            return
        # By address, not epoch: a restarted controller counts epochs from 1 again.
        addresses = [m.address for m in membership.members if m.role == ATTENTION]
        await self._router.set_addresses(addresses)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self.refresh()
            except Exception:  # a refresh must never stop refreshing
                log.exception("reading the cluster's membership failed")
