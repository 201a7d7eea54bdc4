"""The gateway's handle on one attention instance: generate, cancel, load.

Refusals surface as `grpc.RpcError`; their codes are listed in proto/afd/v1/attention.proto.
The channel belongs to the caller, who also closes it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grpc

from services.common import cluster_secret
from services.common.engine_output import EngineOutput
from services.common.sampling_params import SamplingParams
from services.common.wire import attention as wire


class AttentionClient:
    def __init__(self, channel: grpc.Channel, secret: str | None = None) -> None:
        """`secret`: the cluster secret, when the instance requires it (cluster_secret.py)."""
        self._stub = wire.attention_stub(channel)
        self._metadata = cluster_secret.metadata(secret)

    def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        timeout_s: float | None = None,
    ) -> Iterator[EngineOutput]:
        """The request's engine outputs, up to the finished one. Closing the iterator early
        (`close()`) cancels the call, and the instance aborts the request."""
        request = wire.generate_request(request_id, prompt_token_ids, params)
        call = self._stub.Generate(request, timeout=timeout_s, metadata=self._metadata)
        return _outputs(request_id, call)

    def cancel(self, request_id: str, *, timeout_s: float | None = None) -> None:
        """Abort the request if it runs; its stream then ends with finish_reason "abort"."""
        request = wire.cancel_request(request_id)
        self._stub.Cancel(request, timeout=timeout_s, metadata=self._metadata)

    def load(self, *, timeout_s: float | None = None) -> wire.InstanceLoad:
        reply = self._stub.GetLoad(
            wire.get_load_request(), timeout=timeout_s, metadata=self._metadata
        )
        return wire.load_from_proto(reply)


def _outputs(request_id: str, call) -> Iterator[EngineOutput]:
    """`call` is grpc's response iterator, which is also the call's handle."""
    try:
        for message in call:
            yield wire.output_from_proto(request_id, message)
    finally:
        call.cancel()  # a no-op once the call has ended
