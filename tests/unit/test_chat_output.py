"""A chat choice's output as the API returns it, checked with the official `openai` client's
own code: the streamed chunks, assembled by its `ChatCompletionStreamState`, give the same
message as the whole answer (content, reasoning_content, tool_calls with their arguments)."""

import json

from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from services.gateway.chat_output import ChatOutput, OutputOptions, message
from services.gateway.responses import Formatter, Header
from tests.unit.test_step3_tools import TOOLS, WELL_FORMED

OUTPUT = "Two calls are needed.\n</think>\n\n" + WELL_FORMED
OPTIONS = OutputOptions(thinking=True, tools=TOOLS)
HEADER = Header("chatcmpl-1", "tiny")


def assembled(text: str, options: OutputOptions, size: int):
    """The final completion the openai client assembles from the stream of `text`."""
    formatter, output = Formatter(tokenizer=None), ChatOutput(options)  # type: ignore[arg-type]
    chunks = [formatter.chat_chunk(HEADER, 0, {"role": "assistant", "content": ""})]
    for start in range(0, len(text), size):
        if delta := output.feed(text[start : start + size]):
            chunks.append(formatter.chat_chunk(HEADER, 0, delta))
    if delta := output.finish():
        chunks.append(formatter.chat_chunk(HEADER, 0, delta))
    chunks.append(formatter.chat_chunk(HEADER, 0, {}, None, output.finish_reason("stop")))
    state = ChatCompletionStreamState(input_tools=TOOLS)
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    return state.get_final_completion().choices[0], chunks


def test_streamed_tool_calls_assemble_into_the_whole_answer():
    whole = message(OUTPUT, OPTIONS)
    for size in (1, 4, 50, len(OUTPUT)):
        choice, _ = assembled(OUTPUT, OPTIONS, size)
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == whole["content"] == "Let me check."
        calls = choice.message.tool_calls
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris", "days": 2}),
            ("now", {}),
        ]
        assert [c.function.arguments for c in calls] == [
            c["function"]["arguments"] for c in whole["tool_calls"]
        ]
        # The client keeps fields it does not know, such as the reasoning.
        assert choice.message.model_extra["reasoning_content"] == "Two calls are needed.\n"


def test_the_whole_answer_parses_as_the_client_s_chat_completion():
    fields = message(OUTPUT, OPTIONS)
    body = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "tiny",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None,
                     "message": {"role": "assistant", **fields}}],
    }  # fmt: skip
    parsed = ChatCompletion.model_validate(body).choices[0].message
    assert parsed.reasoning_content == "Two calls are needed.\n"  # type: ignore[attr-defined]
    assert [c.id for c in parsed.tool_calls] == [c["id"] for c in fields["tool_calls"]]


def test_without_tools_or_reasoning_the_text_is_content():
    plain = OutputOptions(thinking=False)
    assert message(OUTPUT, plain)["content"].startswith("Two calls are needed.")
    assert "tool_calls" not in message(OUTPUT, plain)
    hidden = OutputOptions(thinking=True, include_reasoning=False, tools=TOOLS)
    assert "reasoning_content" not in message(OUTPUT, hidden)
    # Only the first call when the request asks for no parallel calls.
    first = OutputOptions(thinking=True, tools=TOOLS, parallel_tool_calls=False)
    assert [c["function"]["name"] for c in message(OUTPUT, first)["tool_calls"]] == ["get_weather"]
    choice, _ = assembled(OUTPUT, first, 3)
    assert len(choice.message.tool_calls) == 1
