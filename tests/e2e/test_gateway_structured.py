"""Reasoning, tool calls and structured output through the gateway: the model's text read into
the API's structures (`reasoning_content`, `tool_calls`, schema-valid JSON), checked with the
official `openai` client against the single-process engine and the schemas. Fixtures are in
conftest.py."""

from __future__ import annotations

import json

import openai
import pytest

from services.gateway.reasoning import split_reasoning
from services.gateway.step3_tools import parse_tool_calls
from tests.support.gateway import MESSAGES, NO_THINKING


def greedy_text(engine, prompt_ids: list[int], max_tokens: int) -> str:
    from services.common.sampling_params import SamplingParams

    (out,) = engine.generate([prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return out.text


def test_the_thinking_section_comes_back_as_reasoning_content(
    client, model_name, engine, tokenizer
):
    # The template opens a thinking section: the output starts as reasoning (vLLM's field).
    expected = split_reasoning(greedy_text(engine, tokenizer.encode_chat(MESSAGES), 12), True)
    chat = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=12, temperature=0
    )
    message = chat.choices[0].message
    assert (message.model_extra["reasoning_content"] or "", message.content or "") == expected
    chunks = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=12, temperature=0, stream=True
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = (
        "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas),
        "".join(d.content or "" for d in deltas),
    )
    assert streamed == expected
    hidden = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=12, temperature=0,
        extra_body={"include_reasoning": False},
    )  # fmt: skip
    assert "reasoning_content" not in (hidden.choices[0].message.model_extra or {})


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CALLED = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


def test_tools_and_a_tool_result_reach_the_model_as_the_template_renders_them(
    client, model_name, engine, tokenizer
):
    as_template = [
        CALLED[0],
        {**CALLED[1], "tool_calls": [{**CALLED[1]["tool_calls"][0], "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        CALLED[2],
    ]  # fmt: skip
    no_thinking = NO_THINKING["chat_template_kwargs"]
    prompt = tokenizer.encode_chat(as_template, tools=TOOLS, template_kwargs=no_thinking)
    reply = client.chat.completions.create(
        model=model_name, messages=CALLED, tools=TOOLS, max_tokens=8, temperature=0,
        extra_body=NO_THINKING,
    )  # fmt: skip
    assert reply.usage.prompt_tokens == len(prompt)
    content, calls = parse_tool_calls(greedy_text(engine, prompt, 8), TOOLS)
    message = reply.choices[0].message
    assert (message.content or "", len(message.tool_calls or [])) == (content, len(calls))
    # tool_choice "none": the tools are not offered at all.
    unoffered = client.chat.completions.create(
        model=model_name, messages=CALLED, tools=TOOLS, tool_choice="none", max_tokens=1,
        extra_body=NO_THINKING,
    )  # fmt: skip
    assert unoffered.usage.prompt_tokens == len(
        tokenizer.encode_chat(as_template, template_kwargs=no_thinking)
    )


def test_a_broken_tool_call_in_the_history_is_400_naming_it(client, model_name):
    broken = [CALLED[0], {**CALLED[1], "tool_calls": [{**CALLED[1]["tool_calls"][0], "function": {
        "name": "get_weather", "arguments": "{not json"}}]}, CALLED[2]]  # fmt: skip
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model_name, messages=broken, tools=TOOLS)
    assert "messages.1.tool_calls.0.function.arguments" in caught.value.body["message"]


def test_response_format_json_schema_holds_the_random_model_to_the_schema(client, model_name):
    jsonschema = pytest.importorskip("jsonschema")
    from tests.model.test_structured_output import JSON_SCHEMA, SCHEMA

    ask = dict(model=model_name, messages=MESSAGES, max_tokens=120, extra_body=NO_THINKING)
    greedy = client.chat.completions.create(**ask, temperature=0, response_format=JSON_SCHEMA)
    sampled = client.chat.completions.create(
        **ask, temperature=1.0, seed=3, n=2, response_format=JSON_SCHEMA
    )
    stream = client.chat.completions.create(
        **ask, temperature=1.0, seed=4, stream=True, response_format=JSON_SCHEMA
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    texts = [greedy.choices[0].message.content, *(c.message.content for c in sampled.choices)]
    for text in [*texts, streamed]:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert greedy.choices[0].finish_reason == "stop"
    anything = client.chat.completions.create(
        **ask, temperature=1.0, seed=5, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(anything.choices[0].message.content), dict)


def test_tool_choice_required_and_named_make_the_model_call_tools(client, model_name):
    jsonschema = pytest.importorskip("jsonschema")
    from tests.model.test_structured_output import TOOLS as SCHEMAS

    ask = dict(model=model_name, messages=MESSAGES, tools=SCHEMAS, max_tokens=200,
               temperature=1.0, extra_body=NO_THINKING)  # fmt: skip
    required = client.chat.completions.create(**ask, seed=1, tool_choice="required")
    named = client.chat.completions.create(
        **ask, seed=2, tool_choice={"type": "function", "function": {"name": "set_alarm"}}
    )
    chunks = client.chat.completions.create(**ask, seed=3, tool_choice="required", stream=True)
    state = openai.lib.streaming.chat.ChatCompletionStreamState(input_tools=SCHEMAS)
    for chunk in chunks:
        state.handle_chunk(chunk)
    streamed = state.get_final_completion().choices[0]
    for choice in (required.choices[0], named.choices[0], streamed):
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            spec = {t["function"]["name"]: t["function"]["parameters"] for t in SCHEMAS}
            jsonschema.validate(json.loads(call.function.arguments), spec[call.function.name])
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["set_alarm"]
