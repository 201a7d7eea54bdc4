"""The attention service's messages (proto/afd/v1/attention.proto) <-> plain Python:
sampling parameters, engine outputs (services/common/engine_output.py), load reports; and the
generated stub and servicer base.

Common never imports a service, so the driver's `Load` is known here only by its shape (the
Protocol below). No torch: the gateway imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import grpc

from services.common.engine_output import EngineOutput
from services.common.logprobs import TokenLogprob
from services.common.sampling_params import SamplingParams
from services.common.wire.gen.afd.v1 import attention_pb2 as pb
from services.common.wire.gen.afd.v1 import attention_pb2_grpc as pb_grpc

AttentionServiceServicer = pb_grpc.AttentionServiceServicer
add_attention_service_to_server = pb_grpc.add_AttentionServiceServicer_to_server
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AttentionService"].full_name

# Every SamplingParams field has a namesake in the message; the API tests keep it so.
_PARAM_FIELDS = tuple(f.name for f in fields(SamplingParams))
_REPEATED_PARAM_FIELDS = ("stop", "stop_token_ids")
_MAP_PARAM_FIELDS = ("logit_bias",)  # pairs in SamplingParams, a map on the wire


class LoadLike(Protocol):
    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def num_total_blocks(self) -> int: ...
    @property
    def admitting(self) -> bool: ...


@dataclass(frozen=True)
class InstanceLoad:
    """An attention instance's load, as the router sees it."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    admitting: bool = True  # False: draining or re-forming, send new requests elsewhere


def attention_stub(channel: grpc.Channel) -> pb_grpc.AttentionServiceStub:
    return pb_grpc.AttentionServiceStub(channel)


def params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    values = {name: getattr(params, name) for name in _PARAM_FIELDS}
    values |= {name: dict(values[name]) for name in _MAP_PARAM_FIELDS}
    return pb.SamplingParams(**{name: v for name, v in values.items() if v is not None})


def params_from_proto(message: pb.SamplingParams) -> SamplingParams:
    """Unset fields take SamplingParams' defaults; out-of-range values raise ValueError."""
    values: dict[str, object] = {
        name: getattr(message, name)
        for name in _PARAM_FIELDS
        if name not in _REPEATED_PARAM_FIELDS + _MAP_PARAM_FIELDS and message.HasField(name)
    }
    values |= {name: tuple(getattr(message, name)) for name in _REPEATED_PARAM_FIELDS}
    values |= {name: tuple(sorted(getattr(message, name).items())) for name in _MAP_PARAM_FIELDS}
    return SamplingParams(**values)  # type: ignore[arg-type]


def generate_request(
    request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=prompt_token_ids,
        params=params_to_proto(params),
    )


def output_to_proto(output: EngineOutput) -> pb.GenerateResponse:
    """The response for one engine output (its request id travels beside it)."""
    return pb.GenerateResponse(
        new_token_ids=output.new_token_ids,
        finished=output.finished,
        finish_reason=output.finish_reason or "",
        stop_token_id=output.stop_reason,
        num_prompt_tokens=output.num_prompt_tokens,
        num_cached_tokens=output.num_cached_tokens,
        logprobs=[_logprob_to_proto(lp) for lp in output.new_logprobs],
        prompt_logprobs=[_logprob_to_proto(lp) for lp in output.prompt_logprobs],
    )


def _logprob_to_proto(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def _logprob_from_proto(lp: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))


def output_from_proto(request_id: str, message: pb.GenerateResponse) -> EngineOutput:
    return EngineOutput(
        request_id=request_id,
        new_token_ids=tuple(message.new_token_ids),
        new_logprobs=tuple(_logprob_from_proto(lp) for lp in message.logprobs),
        finished=message.finished,
        finish_reason=message.finish_reason or None,
        stop_reason=message.stop_token_id if message.HasField("stop_token_id") else None,
        num_prompt_tokens=message.num_prompt_tokens,
        num_cached_tokens=message.num_cached_tokens,
        prompt_logprobs=tuple(_logprob_from_proto(lp) for lp in message.prompt_logprobs),
    )


def load_to_proto(load: LoadLike) -> pb.Load:
    return pb.Load(
        num_running=load.num_running,
        num_waiting=load.num_waiting,
        num_free_blocks=load.num_free_blocks,
        num_total_blocks=load.num_total_blocks,
        not_admitting=not load.admitting,
    )


def load_from_proto(message: pb.Load) -> InstanceLoad:
    return InstanceLoad(
        num_running=message.num_running,
        num_waiting=message.num_waiting,
        num_free_blocks=message.num_free_blocks,
        num_total_blocks=message.num_total_blocks,
        admitting=not message.not_admitting,
    )


def cancel_request(request_id: str) -> pb.CancelRequest:
    return pb.CancelRequest(request_id=request_id)


def cancel_response() -> pb.CancelResponse:
    return pb.CancelResponse()


def get_load_request() -> pb.GetLoadRequest:
    return pb.GetLoadRequest()


# Sessions: many requests on one stream (the Session RPC).


class SessionRefusal(grpc.RpcError):
    """A session's request that was refused or failed, with the status code and message
    its own Generate call would have ended with (so callers handle both alike)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self._code = code
        self._message = message

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message


_STATUS_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}


def session_generate(
    request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
) -> pb.SessionRequest:
    return pb.SessionRequest(generate=generate_request(request_id, prompt_token_ids, params))


def session_cancel(request_id: str) -> pb.SessionRequest:
    return pb.SessionRequest(cancel=cancel_request(request_id))


def session_output(output: EngineOutput) -> pb.SessionDelta:
    return pb.SessionDelta(request_id=output.request_id, response=output_to_proto(output))


def session_error(request_id: str, code: grpc.StatusCode, message: str) -> pb.SessionDelta:
    error = pb.SessionError(code=code.value[0], message=message)
    return pb.SessionDelta(request_id=request_id, error=error)


def session_response(deltas: list[pb.SessionDelta]) -> pb.SessionResponse:
    return pb.SessionResponse(deltas=deltas)


def session_item(delta: pb.SessionDelta) -> EngineOutput | SessionRefusal:
    """A session delta as the client sees it: the request's next output, or its refusal."""
    if delta.WhichOneof("kind") == "error":
        code = _STATUS_BY_VALUE.get(delta.error.code, grpc.StatusCode.UNKNOWN)
        return SessionRefusal(code, delta.error.message)
    return output_from_proto(delta.request_id, delta.response)
