"""The OpenAI request bodies, as pydantic models, and their conversion to `SamplingParams`.

Pydantic lives here, at the HTTP edge, and nowhere else. Unknown fields are ignored (clients
send many), except OpenAI features this server does not have (the legacy `functions`),
which are refused rather than silently dropped. Wrong
types and out-of-range values become a 400 that names the field. Types are strict (no "0.5"
for a number, no 1 for a bool) except that JSON has one number type: an integer is a valid
float, and a float with no fraction (16.0) a valid integer, as JSON Schema reads them.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema

from services.common.sampling_params import SamplingParams
from services.gateway.errors import APIError, invalid

MAX_N = 64
MAX_STOP = 16
MAX_CHOICES = 256  # prompts x n of one request; more could never all get a slot at once
# The attention API's widths (attention.proto): a seed is an int64, top_k a uint32.
MIN_SEED, MAX_SEED = -(1 << 63), (1 << 63) - 1
MAX_TOP_K = (1 << 32) - 1
_PARAM_NAMES = {f.name for f in fields(SamplingParams)}


def _integral(value: Any) -> Any:
    """16.0 as the integer 16: JSON has one number type and some clients always send floats."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# After the limits in `Annotated[int, Field(...), INTEGRAL]`, so the JSON schema keeps them.
INTEGRAL = BeforeValidator(_integral)


NumLogprobs = Annotated[int, Field(ge=0, le=SamplingParams.MAX_LOGPROBS), INTEGRAL]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    def check(self) -> None:
        """Refuses, with an `APIError`, what the types alone cannot say."""


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]  # this model reads text only: an image is refused, not dropped
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str  # a JSON object, as OpenAI sends it


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class _Message(_Body):
    """What every chat message has; each role's own class says what else it has, so the
    published schema (and a client reading it) knows, for instance, that a tool message
    needs the id of the call it answers."""

    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self, index: int) -> dict[str, Any]:
        """The message as chat templates read it (transformers' shape): text parts joined."""
        message: dict[str, Any] = {
            "role": self.role,  # type: ignore[attr-defined]
            "content": None if self.content is None else self.text(),
        }
        if self.name is not None:
            message["name"] = self.name
        return message


class SystemMessage(_Message):
    # "developer" is OpenAI's newer name for "system", and reaches the template as "system".
    role: Literal["system", "developer"]

    def for_template(self, index: int) -> dict[str, Any]:
        return {**super().for_template(index), "role": "system"}


class UserMessage(_Message):
    role: Literal["user"]


class AssistantMessage(_Message):
    role: Literal["assistant"]
    tool_calls: list[ToolCall] | None = None  # its calls, sent back in the history

    def for_template(self, index: int) -> dict[str, Any]:
        """A call's arguments reach the template as the object they spell, as vLLM and
        transformers pass them."""
        message = super().for_template(index)
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": call.type,
                    "function": {
                        "name": call.function.name,
                        "arguments": _arguments(call.function.arguments, index, i),
                    },
                }
                for i, call in enumerate(self.tool_calls)
            ]
        return message


class ToolMessage(_Message):
    role: Literal["tool"]
    tool_call_id: str  # the call it answers

    def for_template(self, index: int) -> dict[str, Any]:
        return {**super().for_template(index), "tool_call_id": self.tool_call_id}


ChatMessage = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")
]
ROLES = ("system", "developer", "user", "assistant", "tool")


def _arguments(text: str, message: int, call: int) -> dict[str, Any]:
    where = f"messages.{message}.tool_calls.{call}.function.arguments"
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise invalid(
            f"'{where}' must be a JSON object (as a string), got {text[:80]!r}",
            param=f"messages.{message}",
        )
    return value


class FunctionDefinition(_Body):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class _Sampling(_Body):
    """The fields both endpoints share."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=MAX_TOP_K), INTEGRAL] | None = None  # -1, 0: off (vLLM's)
    seed: Annotated[int, Field(ge=MIN_SEED, le=MAX_SEED), INTEGRAL] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N), INTEGRAL] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    user: str | None = None
    # Token id (as a string, as JSON keys are) -> bias in [-100, 100].
    logit_bias: dict[str, Annotated[float, INTEGRAL]] | None = None
    # text, json_object or json_schema: the output held to it (structured.py).
    response_format: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    logprobs: bool = False
    top_logprobs: NumLogprobs | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    functions: list[Any] | None = None  # OpenAI's deprecated form of tools: refused
    # Variables for the chat template (vLLM's field): {"enable_thinking": false}, ...
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool = True  # vLLM's: false leaves the reasoning out of the answer

    def check(self) -> None:
        super().check()
        if self.functions:
            raise invalid(
                "functions (OpenAI's deprecated function calling) are not supported by this "
                'server: send them as tools, [{"type": "function", "function": ...}]',
                param="functions",
            )
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise invalid(
                "tool_choice is only allowed when tools are given: add tools, or remove "
                "tool_choice",
                param="tool_choice",
            )
        named = self.named_function
        if named is not None and named not in {tool.function.name for tool in self.tools or ()}:
            raise invalid(
                f"tool_choice names the function {named!r}, which is not among the tools",
                param="tool_choice",
            )
        if self.forces_calls and (self.response_format or {}).get("type", "text") != "text":
            raise invalid(
                "tool_choice required or a named function, and response_format, each ask for "
                "the whole output: send one of them",
                param="tool_choice",
            )

    @property
    def named_function(self) -> str | None:
        """The function `tool_choice` names, if it names one."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return None

    @property
    def forces_calls(self) -> bool:
        """Whether the output must be tool calls (tool_choice "required" or named)."""
        return self.tool_choice == "required" or self.named_function is not None

    @property
    def calls_tools(self) -> bool:
        """Whether the model is offered the tools (and its output is read for calls)."""
        return bool(self.tools) and self.tool_choice != "none"

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.for_template(i) for i, m in enumerate(self.messages)]

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates read them, or None when they are not offered."""
        if not self.calls_tools:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools or ()]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


TokenId = Annotated[int, Field(ge=0), INTEGRAL]
Prompt = str | list[str] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    logprobs: NumLogprobs | None = None
    # The prompt comes back before the completion, with its logprobs when logprobs are
    # asked for (the first token's null): what evaluation harnesses read log-likelihoods from.
    echo: bool = False
    suffix: None = None
    # 0 with echo: score the prompt only (no completion).
    max_tokens: Annotated[int, Field(ge=0), INTEGRAL] | None = None

    def check(self) -> None:
        super().check()
        if self.max_tokens == 0 and not self.echo:
            raise invalid(
                "max_tokens 0 asks for no completion, which is only useful with echo: true "
                "(the prompt's logprobs); send max_tokens of at least 1, or echo",
                param="max_tokens",
            )
        prompt = self.prompt
        num_prompts = 1 if isinstance(prompt, str) or _token_ids(prompt) else len(prompt)
        if num_prompts * self.n > MAX_CHOICES:
            raise too_many_choices(num_prompts, self.n)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        return self.logprobs


def openapi_schemas() -> dict[str, Any]:
    """The request bodies' JSON schemas and those of their parts, by name: OpenAPI's
    `components.schemas`, so the published schema holds what `parse` accepts."""
    models = [(model, "validation") for model in (ChatCompletionRequest, CompletionRequest)]
    _, schema = models_json_schema(models, ref_template=_REF)
    return schema["$defs"]


def openapi_body(model: type[_Body]) -> dict[str, Any]:
    """An operation's `requestBody`: `model` as JSON (the handlers read the raw body)."""
    body_schema = {"$ref": _REF.format(model=model.__name__)}
    return {"required": True, "content": {"application/json": {"schema": body_schema}}}


_REF = "#/components/schemas/{model}"


def too_many_choices(num_prompts: int, n: int) -> APIError:
    return invalid(
        f"this request asks for {num_prompts * n} completions ({num_prompts} prompts x n={n}); "
        f"at most {MAX_CHOICES} fit in one request: send fewer prompts or a smaller n, or "
        "split it into several requests",
        param="n" if num_prompts == 1 else "prompt",
    )


def _token_ids(prompt: list[Any]) -> bool:
    return bool(prompt) and all(isinstance(p, int) for p in prompt)


def parse(model: type[_Body], raw: bytes) -> Any:
    """The validated body; malformed JSON or a bad field raises a 400 that names it."""
    try:
        body = model.model_validate_json(raw)
    except ValidationError as err:
        raise _validation_error(err) from None
    body.check()
    return body


def _validation_error(err: ValidationError) -> APIError:
    found = err.errors(include_url=False)
    if found[0]["type"] in ("json_invalid", "json_type"):
        return invalid(f"the body is not valid JSON: {found[0]['msg']}; send a JSON object")
    # A union reports one error per member; the deepest is the member the client meant
    # (`[-1]` is a list of token ids with a negative id, not a string), a broken limit
    # before a wrong type. `param` is the field, the message names the place inside it.
    index = min(
        range(len(found)),
        key=lambda i: (-len(found[i]["loc"]), found[i]["type"].endswith("_type"), i),
    )
    best = found[index]
    param = ".".join(str(part) for part in _until_union(found[0]["loc"])) or None
    place = ".".join(str(part) for part in best["loc"] if not _is_union_member(part))
    given = best.get("input")
    if not place:
        return invalid(
            f"the body must be a JSON object of the request's fields, got {_json_type(given)}"
        )
    if best["type"] == "missing":
        return invalid(f"'{place}' is required", param=param)
    if best["type"] == "union_tag_not_found":  # a chat message without a role
        field = best["ctx"]["discriminator"].strip("'")
        return invalid(f"'{place}.{field}' is required", param=f"{param}.{field}")
    shown = _json_type(given) if isinstance(given, dict | list) else json.dumps(given)
    return invalid(f"invalid value {shown} for '{place}': {best['msg']}", param=param)


def _until_union(location: tuple[Any, ...]) -> list[Any]:
    parts = []
    for part in location:
        if part in ROLES:
            continue  # a chat message's class: the client named no such field
        if _is_union_member(part):
            break
        parts.append(part)
    return parts


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type: what the client sent, in its words."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def _int64(value: int) -> int:
    """`value` wrapped into the int64 range, so the seeds of choices past MAX_SEED stay apart."""
    return (value - MIN_SEED) % (1 << 64) + MIN_SEED


def _is_union_member(part: Any) -> bool:
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "list[str]", "list[int]", "list[list[int]]", "none")
        or part in ROLES  # a chat message's class, by its role
        or part.startswith(("list[", "function-", "constrained-", "TextPart"))
    )


def logit_bias(body: _Sampling, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """The request's logit_bias as (token id, bias) pairs, each id checked against the
    vocabulary."""
    pairs = []
    for key, bias in (body.logit_bias or {}).items():
        token = int(key) if key.strip().isdigit() else -1
        if not 0 <= token < vocab_size:
            raise invalid(
                f"logit_bias key {key!r} is not a token id of this model's vocabulary "
                f"(0..{vocab_size - 1}): key it by token id, as a string",
                param="logit_bias",
            )
        pairs.append((token, bias))
    return tuple(sorted(pairs))


def sampling_params(
    body: _Sampling,
    max_tokens: int,
    seed_offset: int = 0,
    vocab_size: int | None = None,
    grammar: str | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The engine's parameters for choice `seed_offset` of `body` (seeds differ per choice);
    `vocab_size`: what logit_bias's token ids are checked against (None: not checked);
    `grammar`: what the output must follow (structured.py)."""
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(not s for s in stop):
        raise invalid("stop strings must not be empty", param="stop")
    values: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "top_k": max(body.top_k or 0, 0),
        "seed": None if body.seed is None else _int64(body.seed + seed_offset),
        "stop": stop,
        "ignore_eos": body.ignore_eos,
        # Step-3's tool-call markers may be special tokens of its tokenizer: the tool parser
        # must see them (vLLM's Step-3 tool parser asks the same); the stop token's own text
        # is never shown either way (text_stream.py).
        "skip_special_tokens": body.skip_special_tokens and not getattr(body, "calls_tools", False),
        "logprobs": body.num_logprobs(),
        "logit_bias": logit_bias(body, vocab_size if vocab_size is not None else 1 << 31),
        "grammar": grammar,
        "prompt_logprobs": prompt_logprobs,
    }
    values["presence_penalty"] = body.presence_penalty
    values["frequency_penalty"] = body.frequency_penalty
    try:
        return SamplingParams(**values)
    except ValueError as err:
        param = str(err).split(" ", 1)[0]
        raise invalid(str(err), param=param if param in _PARAM_NAMES else None) from None
