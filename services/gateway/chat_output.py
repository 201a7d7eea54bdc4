"""One chat choice's output as the API returns it: reasoning, content and tool calls.

The model's text goes through the reasoning parser (reasoning.py: the thinking section
becomes `reasoning_content`), then, when the request offered tools, through the tool-call
parser (step3_tools.py: the calls become `tool_calls`, the rest `content`). `ChatOutput`
does it as the text streams, turning each piece into a chunk's `delta`; `message` does it
for a whole answer. A choice that called a tool and stopped on its own finishes with
"tool_calls", as OpenAI's do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.gateway.reasoning import ReasoningParser
from services.gateway.step3_tools import Arguments, CallStart, ToolCall, ToolCallParser


@dataclass(frozen=True)
class OutputOptions:
    """What one request asks of its choices' output."""

    thinking: bool  # the prompt left a thinking section open (reasoning.opens_thinking)
    reasoning: bool = True  # split the reasoning out (the server's --reasoning-parser)
    include_reasoning: bool = True  # return it (false: drop it)
    tools: list[dict[str, Any]] | None = None  # offered: the output is read for calls
    parallel_tool_calls: bool = True  # false: the first call only


class ChatOutput:
    def __init__(self, options: OutputOptions) -> None:
        self.options = options
        self._reasoning = ReasoningParser(options.thinking) if options.reasoning else None
        self._tools = ToolCallParser(options.tools) if options.tools is not None else None
        self.called = False  # a tool call began

    def feed(self, text: str) -> dict[str, Any]:
        """A piece of the model's text -> the delta it adds (empty: nothing to say yet)."""
        reasoning, content = self._reasoning.feed(text) if self._reasoning else ("", text)
        return self._delta(reasoning, content, finished=False)

    def finish(self) -> dict[str, Any]:
        """What the parsers held back, once the output ended."""
        reasoning, content = self._reasoning.finish() if self._reasoning else ("", "")
        return self._delta(reasoning, content, finished=True)

    @property
    def calls(self) -> list[ToolCall]:
        """The calls completed so far (every one, once finished); the first only when the
        request asked for no parallel calls."""
        calls = self._tools.calls if self._tools is not None else []
        return calls if self.options.parallel_tool_calls else calls[:1]

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.called and reason == "stop" else reason

    def _delta(self, reasoning: str, content: str, finished: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if reasoning and self.options.include_reasoning:
            delta["reasoning_content"] = reasoning
        if self._tools is None:
            if content:
                delta["content"] = content
            return delta
        events = self._tools.feed(content)
        if finished:
            events += self._tools.finish()
        text, calls = "", []
        for event in events:
            if isinstance(event, str):
                text += event
            elif event.index == 0 or self.options.parallel_tool_calls:
                calls.append(_call_delta(event))
                self.called = True
        if text:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = calls
        return delta


def message(text: str, options: OutputOptions) -> dict[str, Any]:
    """A whole answer's message fields (role aside): content, reasoning_content, tool_calls."""
    output = ChatOutput(options)
    deltas = [output.feed(text), output.finish()]
    content = "".join(d.get("content", "") for d in deltas)
    fields: dict[str, Any] = {}
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    if options.reasoning and options.include_reasoning:
        fields["reasoning_content"] = reasoning or None
    calls = [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in output.calls
    ]
    fields["content"] = content if content or not calls else None
    if calls:
        fields["tool_calls"] = calls
    return fields


def _call_delta(event: CallStart | Arguments) -> dict[str, Any]:
    """A tool-call event as a streamed `tool_calls` entry, as the openai client joins them:
    the first of a call carries its id and name, the next ones pieces of its arguments."""
    if isinstance(event, CallStart):
        return {
            "index": event.index,
            "id": event.id,
            "type": "function",
            "function": {"name": event.name, "arguments": ""},
        }
    return {"index": event.index, "function": {"arguments": event.text}}
