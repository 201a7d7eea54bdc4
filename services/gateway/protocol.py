"""The OpenAI request bodies, as pydantic models, and their conversion to `SamplingParams`.

Pydantic lives here, at the HTTP edge, and nowhere else. Unknown fields are ignored (clients
send many); wrong types and out-of-range values become a 400 that names the field. Types are
strict (no "0.5" for a number, no 1 for a bool) except that an integer is a valid float.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.sampling_params import SamplingParams
from services.gateway.errors import APIError, invalid

MAX_N = 64
MAX_STOP = 16
_PARAM_NAMES = {f.name for f in fields(SamplingParams)}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")


class _Sampling(_Body):
    """The fields both endpoints share."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 or 0: off (vLLM's convention)
    seed: int | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=SamplingParams.MAX_LOGPROBS)] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    logprobs: Annotated[int, Field(ge=0, le=SamplingParams.MAX_LOGPROBS)] | None = None
    echo: Literal[False] = False
    suffix: None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        return self.logprobs


def parse(model: type[_Body], raw: bytes) -> Any:
    """The validated body; malformed JSON or a bad field raises a 400 that names it."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        raise _validation_error(err) from None


def _validation_error(err: ValidationError) -> APIError:
    first = err.errors(include_url=False)[0]
    if first["type"] in ("json_invalid", "json_type"):
        return invalid(f"the body is not valid JSON: {first['msg']}; send a JSON object")
    # Unions report one error per member; the location up to the member is the field.
    location = [str(part) for part in first["loc"] if not _is_union_member(part)]
    param = ".".join(location) or None
    if first["type"] == "missing":
        return invalid(f"'{param}' is required", param=param)
    given = first.get("input")
    shown = repr(given) if not isinstance(given, dict | list) else type(given).__name__
    return invalid(f"invalid value {shown} for '{param}': {first['msg']}", param=param)


def _is_union_member(part: Any) -> bool:
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "list[str]", "list[int]", "list[list[int]]", "none")
        or part.startswith(("list[", "function-", "constrained-", "TextPart"))
    )


def sampling_params(body: _Sampling, max_tokens: int, seed_offset: int = 0) -> SamplingParams:
    """The engine's parameters for choice `seed_offset` of `body` (seeds differ per choice)."""
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(not s for s in stop):
        raise invalid("stop strings must not be empty", param="stop")
    values: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "top_k": max(body.top_k or 0, 0),
        "seed": None if body.seed is None else body.seed + seed_offset,
        "stop": stop,
        "ignore_eos": body.ignore_eos,
        "skip_special_tokens": body.skip_special_tokens,
        "logprobs": body.num_logprobs(),
    }
    values["presence_penalty"] = body.presence_penalty
    values["frequency_penalty"] = body.frequency_penalty
    try:
        return SamplingParams(**values)
    except ValueError as err:
        param = str(err).split(" ", 1)[0]
        raise invalid(str(err), param=param if param in _PARAM_NAMES else None) from None
