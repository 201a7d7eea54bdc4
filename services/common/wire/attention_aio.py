"""The gateway's asyncio handle on one attention instance: generate, cancel, load, health.

The asyncio twin of `attention_client.py`, over a `grpc.aio` channel. Refusals surface as
`grpc.aio.AioRpcError` (a `grpc.RpcError`); their codes are listed in
proto/afd/v1/attention.proto. The channel belongs to the caller, who also closes it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.sampling_params import SamplingParams
from services.common.wire import attention as wire


class AsyncAttentionClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = wire.attention_stub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)

    def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        timeout_s: float | None = None,
    ) -> AsyncIterator[wire.GenerateDelta]:
        """The request's responses, up to the finished one. Leaving the iteration early
        (`aclose()`, or cancelling the task that iterates) cancels the call, and the
        instance aborts the request and frees its KV blocks."""
        request = wire.generate_request(request_id, prompt_token_ids, params)
        return _deltas(self._stub.Generate(request, timeout=timeout_s))

    async def cancel(self, request_id: str, *, timeout_s: float | None = None) -> None:
        """Abort the request if it runs; its stream then ends with finish_reason "abort"."""
        await self._stub.Cancel(wire.cancel_request(request_id), timeout=timeout_s)

    async def load(self, *, timeout_s: float | None = None) -> wire.InstanceLoad:
        message = await self._stub.GetLoad(wire.get_load_request(), timeout=timeout_s)
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


async def _deltas(call) -> AsyncIterator[wire.GenerateDelta]:
    """`call` is grpc.aio's unary-stream call: an async iterator and the call's handle."""
    try:
        async for message in call:
            yield wire.delta_from_proto(message)
    finally:
        call.cancel()  # a no-op once the call has ended
