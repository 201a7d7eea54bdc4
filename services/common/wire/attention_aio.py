"""The gateway's asyncio handle on one attention instance: generate, cancel, load, health.

The asyncio twin of `attention_client.py`, over a `grpc.aio` channel. Refusals surface as
`grpc.aio.AioRpcError` (a `grpc.RpcError`); their codes are listed in
proto/afd/v1/attention.proto. The channel belongs to the caller, who also closes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import cluster_secret
from services.common.engine_output import EngineOutput
from services.common.sampling_params import SamplingParams
from services.common.wire import attention as wire


class AsyncAttentionClient:
    def __init__(self, channel: grpc.aio.Channel, secret: str | None = None) -> None:
        """`secret`: the cluster secret, when the instance requires it (cluster_secret.py)."""
        self._stub = wire.attention_stub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._metadata = cluster_secret.metadata(secret)
        self._session: Session | None = None

    def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        timeout_s: float | None = None,
    ) -> AsyncIterator[EngineOutput]:
        """The request's engine outputs, up to the finished one. Leaving the iteration early
        (`aclose()`, or cancelling the task that iterates) cancels the call, and the
        instance aborts the request and frees its KV blocks."""
        request = wire.generate_request(request_id, prompt_token_ids, params)
        call = self._stub.Generate(request, timeout=timeout_s, metadata=self._metadata)
        return _outputs(request_id, call)

    def generate_in_session(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[EngineOutput]:
        """`generate` over this client's one Session stream, shared by all its requests (one
        message per engine step for all of them). Refusals raise `wire.SessionRefusal`, a
        `grpc.RpcError` with the code `generate` would have raised; the session's end
        raises one with the session's code for every request still open. A new session
        starts with the next request after one ends."""
        if self._session is None or self._session.ended:
            self._session = Session(self._stub, self._metadata)
        return self._session.generate(request_id, prompt_token_ids, params)

    async def cancel(self, request_id: str, *, timeout_s: float | None = None) -> None:
        """Abort the request if it runs; its stream then ends with finish_reason "abort"."""
        request = wire.cancel_request(request_id)
        await self._stub.Cancel(request, timeout=timeout_s, metadata=self._metadata)

    async def load(self, *, timeout_s: float | None = None) -> wire.InstanceLoad:
        message = await self._stub.GetLoad(
            wire.get_load_request(), timeout=timeout_s, metadata=self._metadata
        )
        return wire.load_from_proto(message)

    async def serving(self, *, timeout_s: float | None = None) -> bool:
        """Whether the instance's gRPC health reports the attention service SERVING."""
        return await health_serving(self._health, wire.SERVICE_NAME, timeout_s)


async def health_serving(
    stub: health_pb2_grpc.HealthStub, service: str = "", timeout_s: float | None = None
) -> bool:
    """grpc.health.v1 Check of `service` ("" is the whole server); False when unreachable."""
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def _outputs(request_id: str, call) -> AsyncIterator[EngineOutput]:
    """`call` is grpc.aio's unary-stream call: an async iterator and the call's handle."""
    try:
        async for message in call:
            yield wire.output_from_proto(request_id, message)
    finally:
        call.cancel()  # a no-op once the call has ended


class Session:
    """One Session call: requests written to it, each step's deltas routed to their requests."""

    def __init__(self, stub, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._outgoing: asyncio.Queue = asyncio.Queue()
        self._open: dict[str, asyncio.Queue] = {}
        self.ended = False
        self._call = stub.Session(self._requests(), metadata=metadata)
        self._reader = asyncio.create_task(self._read())

    async def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[EngineOutput]:
        if self.ended:  # nothing would ever answer: fail now, as the open requests did
            raise wire.SessionRefusal(
                grpc.StatusCode.UNAVAILABLE, "the attention instance ended the session"
            )
        if request_id in self._open:
            raise ValueError(f"request id {request_id!r} is already open in this session")
        items: asyncio.Queue = asyncio.Queue()
        self._open[request_id] = items
        self._outgoing.put_nowait(wire.session_generate(request_id, prompt_token_ids, params))
        done = False
        try:
            while True:
                item = await items.get()
                if isinstance(item, BaseException):
                    done = True  # refused, or the session ended: nothing runs to cancel
                    raise item
                yield item
                if item.finished:
                    done = True
                    return
        finally:
            self._open.pop(request_id, None)
            if not done and not self.ended:
                self._outgoing.put_nowait(wire.session_cancel(request_id))  # frees its blocks

    async def _requests(self):
        while True:
            yield await self._outgoing.get()

    async def _read(self) -> None:
        error: BaseException = wire.SessionRefusal(
            grpc.StatusCode.UNAVAILABLE, "the attention instance ended the session"
        )
        try:
            async for response in self._call:
                for delta in response.deltas:
                    items = self._open.get(delta.request_id)
                    if items is not None:
                        items.put_nowait(wire.session_item(delta))
        except grpc.RpcError as err:
            error = err
        finally:
            self.ended = True
            for items in self._open.values():
                items.put_nowait(error)
