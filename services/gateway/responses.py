"""OpenAI response bodies: whole completions, streamed chunks, usage and logprobs, for the
chat and the legacy completions endpoints.

Plain dicts built from the choices' completions (services/common/completion.py) and text
deltas; knows nothing of how the tokens were made.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from services.common.completion import Completion
from services.common.logprobs import TokenLogprob
from services.common.tokenizer import Tokenizer
from services.gateway.chat_output import OutputOptions, message

CHAT = "chat.completion"
CHAT_CHUNK = "chat.completion.chunk"
COMPLETION = "text_completion"
MODEL_LIST = "list"


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": list(properties), "properties": properties}


# The bodies' JSON schemas, for the OpenAPI schema's 200 responses. A whole (not streamed)
# answer has a finish reason in every choice.
_COUNT = {"type": "integer", "minimum": 0}
_TEXT = {"type": "string"}
_HEADER = {"id": _TEXT, "created": {"type": "integer"}, "model": _TEXT}
_FINISHED = {"enum": ["stop", "length", "abort", "tool_calls"]}
_LOGPROBS = {"type": ["object", "null"]}
_USAGE = _object({"prompt_tokens": _COUNT, "completion_tokens": _COUNT, "total_tokens": _COUNT})


def _choices(fields: dict[str, Any]) -> dict[str, Any]:
    choice = _object({"index": _COUNT, **fields, "logprobs": _LOGPROBS, "finish_reason": _FINISHED})
    return {"type": "array", "minItems": 1, "items": choice}


CHAT_SCHEMA = _object(
    {
        **_HEADER,
        "object": {"const": CHAT},
        "choices": _choices(
            {
                "message": _object(
                    {"role": {"const": "assistant"}, "content": {"type": ["string", "null"]}}
                )
            }
        ),
        "usage": _USAGE,
    }
)
COMPLETION_SCHEMA = _object(
    {
        **_HEADER,
        "object": {"const": COMPLETION},
        "choices": _choices({"text": _TEXT}),
        "usage": _USAGE,
    }
)
# A server-sent event, as schemathesis and OpenAPI 3.2's `itemSchema` read it: its `data` is a
# chunk's JSON, an error's JSON or the closing `[DONE]`.
EVENT_SCHEMA = _object({"data": {"type": "string", "minLength": 1}})
MODEL_LIST_SCHEMA = _object(
    {
        "object": {"const": MODEL_LIST},
        "data": {
            "type": "array",
            "items": _object({"id": _TEXT, "object": {"const": "model"}, "max_model_len": _COUNT}),
        },
    }
)


@dataclass(frozen=True)
class Echo:
    """A prompt as a completion echoes it: its text and token ids."""

    text: str
    ids: list[int]


@dataclass(frozen=True)
class Header:
    """The fields every body and chunk of one response repeats."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def usage(num_prompt_tokens: int, num_completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    """OpenAI's usage; `cached`: prompt tokens served from the prefix cache."""
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def joined(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Two completions logprobs objects as one: `after`'s entries follow `before`'s."""
    return {key: before[key] + after[key] for key in before}


def text_end(logprobs: dict[str, Any]) -> int:
    """The text offset just past a completions logprobs object's tokens."""
    return sum(len(token) for token in logprobs["tokens"])


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


class Formatter:
    """Token strings for logprobs need the tokenizer; everything else is shape."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])

    # Chat.

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        def one(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [
                {**one(e.token_id, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]}
                for e in entries
            ],
            "refusal": None,
        }

    def chat_completion(
        self,
        header: Header,
        choices: list[Completion],
        with_logprobs: bool,
        prompt: int,
        options: OutputOptions,
        cached: int = 0,
    ) -> dict[str, Any]:
        answers = []
        for i, c in enumerate(choices):
            fields = message(c.text, options)
            called = "tool_calls" in fields and c.finish_reason == "stop"
            answers.append({
                "index": i,
                "message": {"role": "assistant", **fields, "refusal": None},
                "logprobs": self.chat_logprobs(c.logprobs or []) if with_logprobs else None,
                "finish_reason": "tool_calls" if called else c.finish_reason,
            })  # fmt: skip
        return {
            **header.body(CHAT),
            "choices": answers,
            "usage": usage(prompt, sum(len(c.token_ids) for c in choices), cached),
        }

    def chat_chunk(
        self,
        header: Header,
        index: int,
        delta: dict[str, Any],
        entries: list[TokenLogprob] | None = None,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        return {
            **header.body(CHAT_CHUNK),
            "choices": [
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": None if entries is None else self.chat_logprobs(entries),
                    "finish_reason": finish_reason,
                }
            ],
        }

    # Completions.

    def completion_logprobs(self, entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens = [self.token(e.token_id) for e in entries]
        offsets, position = [], offset
        for text in tokens:
            offsets.append(position)
            position += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self.token(t): v for t, v in e.top} for e in entries],
            "text_offset": offsets,
        }

    def prompt_logprobs(self, ids: list[int], entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        """An echoed prompt's logprobs, as `completion_logprobs` shapes them: every prompt
        token, the first with no logprob (nothing comes before it)."""
        scored = self.completion_logprobs(list(entries), len(self.token(ids[0])))
        return {
            "tokens": [self.token(ids[0]), *scored["tokens"]],
            "token_logprobs": [None, *scored["token_logprobs"]],
            "top_logprobs": [None, *scored["top_logprobs"]],
            "text_offset": [0, *scored["text_offset"]],
        }

    def echoed(
        self, echo: Echo, choice: Completion, with_logprobs: bool
    ) -> tuple[str, dict[str, Any] | None]:
        """A choice's text and logprobs with its prompt before them."""
        if not with_logprobs:
            return echo.text + choice.text, None
        before = self.prompt_logprobs(echo.ids, choice.prompt_logprobs or [])
        after = self.completion_logprobs(choice.logprobs or [], text_end(before))
        return echo.text + choice.text, joined(before, after)

    def completion(
        self,
        header: Header,
        choices: list[Completion],
        with_logprobs: bool,
        prompt: int,
        cached: int = 0,
        echoes: list[Echo] | None = None,
    ) -> dict[str, Any]:
        """`echoes`: each choice's prompt, to come back before it (echo: true)."""
        answers = []
        for i, c in enumerate(choices):
            if echoes is not None:
                text, logprobs = self.echoed(echoes[i], c, with_logprobs)
            else:
                text = c.text
                logprobs = self.completion_logprobs(c.logprobs or [], 0) if with_logprobs else None
            answers.append(
                {"index": i, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}
            )
        return {
            **header.body(COMPLETION),
            "choices": answers,
            "usage": usage(prompt, sum(len(c.token_ids) for c in choices), cached),
        }

    def completion_chunk(
        self,
        header: Header,
        index: int,
        text: str,
        logprobs: dict[str, Any] | None,
        finish_reason: str | None,
    ) -> dict[str, Any]:
        return {
            **header.body(COMPLETION),
            "choices": [
                {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
            ],
        }

    def usage_chunk(
        self, header: Header, obj: str, prompt: int, completion: int, cached: int = 0
    ) -> dict[str, Any]:
        return {**header.body(obj), "choices": [], "usage": usage(prompt, completion, cached)}
