"""Step-3's tool calls in the model's output: parsed whole, or as they stream.

The model writes its calls after its text, in one block:

    text<｜tool_calls_begin｜>
    <｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name="get_weather">
    <steptml:parameter name="city">Paris</steptml:parameter>
    <steptml:parameter name="days">2</steptml:parameter></steptml:invoke><｜tool_call_end｜>
    <｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name="now">...<｜tool_call_end｜>
    <｜tool_calls_end｜>

(the bars are U+FF5C, as Step-3's chat template and tokenizer spell them). Parameter values
are raw text; the tool's JSON schema says how to read each one: a string is the text as it
is (stripped of the whitespace around it), anything else the JSON it spells (the text itself
when it is not JSON), as vLLM and SGLang read this format. A parameter the schema does not
name is read as JSON when it parses. Several calls are parallel calls.

`ToolCallParser.feed` takes the text as it streams and returns what can be said so far:
content (text outside the block), and for each call its start (id and name, once the invoke
tag is complete) and its arguments, one completed parameter at a time, as the pieces of a
JSON object the client concatenates (`{"city": "Paris"`, then `, "days": 2`, then `}`). A
trailing piece that may be the start of a tag is held back until the next text says. The
tags are several tokens in some vocabularies (DeepSeek-V3's among them), so a tag may arrive
split anywhere. `parse_tool_calls` is the same over a whole text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from services.gateway.text_markers import partial_suffix

CALLS_BEGIN = "<｜tool_calls_begin｜>"
CALLS_END = "<｜tool_calls_end｜>"
CALL_BEGIN = "<｜tool_call_begin｜>"
CALL_END = "<｜tool_call_end｜>"
SEP = "<｜tool_sep｜>"
INVOKE = re.compile(r"\s*function\s*" + re.escape(SEP) + r'\s*<steptml:invoke name="([^"]*)">')
PARAMETER = re.compile(r'\s*<steptml:parameter name="([^"]*)">(.*?)</steptml:parameter>', re.DOTALL)
INVOKE_END = "</steptml:invoke>"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as OpenAI's `function.arguments`


@dataclass(frozen=True)
class CallStart:
    index: int  # of the call in this choice, from 0
    id: str
    name: str


@dataclass(frozen=True)
class Arguments:
    index: int
    text: str  # the next piece of the call's JSON arguments


Event = str | CallStart | Arguments  # a str is content


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class _Call:
    index: int
    id: str
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


class ToolCallParser:
    """One choice's output, fed as it streams. `tools`: the request's (OpenAI's shape,
    `{"type": "function", "function": {"name", "parameters"}}`), for the parameters' types."""

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        self._types = {
            tool["function"]["name"]: _property_types(tool["function"].get("parameters"))
            for tool in tools or ()
            if isinstance(tool.get("function"), dict) and "name" in tool["function"]
        }
        self._buffer = ""
        self._state = "text"  # text, block (between calls), call, after (past the block)
        self._call: _Call | None = None
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        """The end of the output (it may have been cut short): what was held back is
        content, and so is what follows the last call that began; a call that began is
        closed with the parameters it completed."""
        events: list[Event] = []
        if self._state == "call":
            self._close_call(events)
        elif self._buffer:
            events.append(self._buffer)
        self._buffer = ""
        return events

    def _step(self, events: list[Event]) -> bool:
        """Consume what the buffer holds for the current state; False when it must wait."""
        b = self._buffer
        if self._state in ("text", "after"):
            marker = CALLS_BEGIN if self._state == "text" else None
            if marker is not None and (at := b.find(marker)) >= 0:
                if at:
                    events.append(b[:at])
                self._buffer, self._state = b[at + len(marker) :], "block"
                return True
            keep = partial_suffix(b, marker) if marker else 0
            if len(b) > keep:
                events.append(b[: len(b) - keep])
                self._buffer = b[len(b) - keep :]
            return False
        if self._state == "block":
            stripped = b.lstrip()
            if stripped.startswith(CALLS_END):
                self._buffer, self._state = stripped[len(CALLS_END) :], "after"
                return True
            if stripped.startswith(CALL_BEGIN):
                rest = stripped[len(CALL_BEGIN) :]
                match = INVOKE.match(rest)
                if match is None:
                    return False  # the invoke tag has not arrived whole yet
                self._call = _Call(len(self.calls), new_call_id(), match.group(1))
                events.append(CallStart(self._call.index, self._call.id, self._call.name))
                self._buffer, self._state = rest[match.end() :], "call"
                return True
            self._buffer = stripped
            return False
        # Inside a call: its parameters, then its end.
        assert self._call is not None
        match = PARAMETER.match(b)
        if match is not None:
            name, value = match.group(1), match.group(2)
            self._add_argument(name, value, events)
            self._buffer = b[match.end() :]
            return True
        stripped = b.lstrip()
        if stripped.startswith(INVOKE_END):
            stripped = stripped[len(INVOKE_END) :].lstrip()
        if stripped.startswith(CALL_END):
            self._close_call(events)
            self._buffer, self._state = stripped[len(CALL_END) :], "block"
            return True
        return False

    def _add_argument(self, name: str, raw: str, events: list[Event]) -> None:
        call = self._call
        assert call is not None
        value = _typed(raw, self._types.get(call.name, {}).get(name))
        first = not call.arguments
        call.arguments[name] = value
        piece = f"{json.dumps(name, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}"
        events.append(Arguments(call.index, ("{" if first else ", ") + piece))

    def _close_call(self, events: list[Event]) -> None:
        call = self._call
        assert call is not None
        events.append(Arguments(call.index, "}" if call.arguments else "{}"))
        arguments = json.dumps(call.arguments, ensure_ascii=False)
        self.calls.append(ToolCall(call.id, call.name, arguments))
        self._call = None


def parse_tool_calls(
    text: str, tools: list[dict[str, Any]] | None = None
) -> tuple[str, list[ToolCall]]:
    """A whole output's content (the text outside the calls) and its calls."""
    parser = ToolCallParser(tools)
    events = parser.feed(text) + parser.finish()
    return "".join(e for e in events if isinstance(e, str)), parser.calls


def _property_types(parameters: Any) -> dict[str, Any]:
    """Each parameter's JSON-schema `type` (a string, a list of them, or None)."""
    if not isinstance(parameters, dict) or not isinstance(parameters.get("properties"), dict):
        return {}
    return {
        name: spec.get("type") if isinstance(spec, dict) else None
        for name, spec in parameters["properties"].items()
    }


def _typed(raw: str, kind: Any) -> Any:
    text = raw.strip()
    kinds = kind if isinstance(kind, list) else [kind]
    if "string" in kinds and len(kinds) == 1:
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text  # not JSON after all: the text, rather than losing the argument
