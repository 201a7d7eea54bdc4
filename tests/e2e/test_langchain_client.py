"""The gateway through a second OpenAI client library: LangChain's `ChatOpenAI`, which builds
its own requests and assembles answers, streamed chunks, tool calls and structured output its
own way. What a LangChain application relies on, against the same real cluster as
test_gateway.py (fixtures in conftest.py)."""

from __future__ import annotations

import pytest

from tests.model.test_structured_output import SCHEMA, TOOLS
from tests.support.gateway import NO_THINKING, PROMPT

langchain_openai = pytest.importorskip("langchain_openai")
messages = pytest.importorskip("langchain_core.messages")
jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def chat(gateway, model_name):
    """A `ChatOpenAI` on the gateway; called with settings, one with those changed."""

    def make(**settings):
        defaults = dict(temperature=0, max_tokens=8, max_retries=0, extra_body=NO_THINKING)
        return langchain_openai.ChatOpenAI(
            base_url=gateway.url + "/v1", api_key="unused", model=model_name,
            **{**defaults, **settings},
        )  # fmt: skip

    return make


def test_invoke_and_stream_give_the_same_answer(chat):
    whole = chat().invoke([messages.HumanMessage(PROMPT)])
    chunks = list(chat().stream([messages.HumanMessage(PROMPT)]))
    assert whole.content
    assert "".join(chunk.content for chunk in chunks) == whole.content
    assert 0 < whole.usage_metadata["output_tokens"] <= 8
    assert whole.response_metadata["finish_reason"] in ("stop", "length")


def test_bound_tools_come_back_as_tool_calls_whole_and_streamed(chat):
    ask = chat(max_tokens=200, temperature=1.0, seed=7).bind_tools(TOOLS, tool_choice="set_alarm")
    whole = ask.invoke([messages.HumanMessage("Wake me at seven.")])
    chunks = list(ask.stream([messages.HumanMessage("Wake me at seven.")]))
    streamed = sum(chunks[1:], chunks[0])  # LangChain's own chunk aggregation
    spec = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for message in (whole, streamed):
        assert message.tool_calls and not message.invalid_tool_calls
        for call in message.tool_calls:
            assert call["name"] == "set_alarm" and call["id"]
            jsonschema.validate(call["args"], spec["set_alarm"])


def test_a_tool_result_sent_back_continues_the_conversation(chat):
    call = {"name": "get_weather", "args": {"city": "Paris", "unit": "celsius"}, "id": "call_1"}
    history = [
        messages.HumanMessage("Weather in Paris?"),
        messages.AIMessage("", tool_calls=[call]),
        messages.ToolMessage("sunny, 21 C", tool_call_id="call_1"),
    ]
    answer = chat().bind_tools(TOOLS).invoke(history)
    assert answer.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")
    assert answer.content or answer.tool_calls


def test_structured_output_parses_into_the_schema(chat):
    person = {"title": "person", **SCHEMA}
    structured = chat(max_tokens=120, temperature=1.0, seed=3).with_structured_output(
        person, method="json_schema", strict=True
    )
    result = structured.invoke([messages.HumanMessage("Describe a person.")])
    jsonschema.validate(result, SCHEMA)
