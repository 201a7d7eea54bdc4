"""A reasoning model's thinking, told apart from its answer, whole or as it streams.

Step-3 thinks first: its chat template ends the prompt inside a thinking section
(`<|BOT|>assistant\\n<think>\\n`), so the output starts as reasoning and turns into the answer
at the first `</think>`, as vLLM's and SGLang's Step-3 reasoning parsers read it. A prompt
that closed the section (thinking turned off, `chat_template_kwargs: {"enable_thinking":
false}`) starts in the answer, unless the output opens a section itself with `<think>`.
The reasoning goes back as `reasoning_content` (vLLM's and DeepSeek's API's field); the
answer's leading whitespace after `</think>` is dropped. While streaming, a trailing piece
that may be the start of a tag is held back until the next text says.
"""

from __future__ import annotations

from services.gateway.text_markers import partial_suffix

THINK_START, THINK_END = "<think>", "</think>"


def opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt leaves a thinking section open for the output."""
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)


class ReasoningParser:
    """One choice's output, fed as it streams: (reasoning, content) pieces."""

    def __init__(self, thinking: bool) -> None:
        """`thinking`: the prompt left a thinking section open."""
        self._state = "reasoning" if thinking else "start"
        self._buffer = ""
        self._at_answer = not thinking  # the answer's leading whitespace is still to drop

    def feed(self, text: str) -> tuple[str, str]:
        self._buffer += text
        reasoning, content = "", ""
        if self._state == "start":  # may open a section itself
            stripped = self._buffer.lstrip()
            if stripped.startswith(THINK_START):
                self._buffer, self._state = stripped[len(THINK_START) :], "reasoning"
            elif THINK_START.startswith(stripped):
                return "", ""  # could still be `<think>`
            else:
                self._state = "answer"
        if self._state == "reasoning":
            if self._buffer.startswith(THINK_START):  # the model opened it again itself
                self._buffer = self._buffer[len(THINK_START) :]
            end = self._buffer.find(THINK_END)
            if end < 0:
                keep = partial_suffix(self._buffer, THINK_END)
                reasoning = self._buffer[: len(self._buffer) - keep]
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return reasoning, ""
            reasoning = self._buffer[:end]
            self._buffer, self._state = self._buffer[end + len(THINK_END) :], "answer"
            self._at_answer = True
        if self._state == "answer":
            content, self._buffer = self._buffer, ""
            if self._at_answer:
                content = content.lstrip()
                self._at_answer = not content
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What was held back: reasoning if the section never closed, else the answer."""
        rest, self._buffer = self._buffer, ""
        if self._state == "reasoning":
            return rest, ""
        return "", rest.lstrip() if self._at_answer else rest


def split_reasoning(text: str, thinking: bool) -> tuple[str, str]:
    """A whole output's (reasoning, content)."""
    parser = ReasoningParser(thinking)
    first, rest = parser.feed(text), parser.finish()
    return first[0] + rest[0], first[1] + rest[1]
