"""Structured output: the random-weight tiny model, held to a JSON schema token by token,
writes JSON that parses and satisfies the schema, greedy and sampled; requests without a
grammar in the same batch get exactly the tokens they get alone."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import numpy as np
import pytest

from services.attention.builder import local_engine
from services.attention.engine import EngineConfig, RequestError
from services.attention.grammar import unpack
from services.common.model.build import load_model
from services.common.sampling_params import SamplingParams
from services.common.tokenizer import Tokenizer
from services.gateway.errors import APIError
from services.gateway.step3_tools import parse_tool_calls
from services.gateway.structured import grammar_for
from services.gateway.tool_grammar import tool_grammar

# Bounded, so that a model with no idea of JSON still finishes within the budget.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "age", "ok", "color", "tags"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("structured") / "tiny"
    command = [sys.executable, "-m", "services.cli", "init-checkpoint", str(folder)]
    subprocess.run([*command, "--preset", "tiny"], check=True, capture_output=True)
    tokenizer = Tokenizer.from_dir(folder)
    model = load_model(folder, dtype="float32", progress=False)
    return local_engine(model, EngineConfig(), tokenizer), tokenizer, folder


def prompt(tokenizer: Tokenizer) -> list[int]:
    messages = [{"role": "user", "content": "Describe a person."}]
    return tokenizer.encode_chat(messages, template_kwargs={"enable_thinking": False})


def test_greedy_and_sampled_outputs_satisfy_the_schema(served):
    engine, tokenizer, _ = served
    grammar = grammar_for(JSON_SCHEMA, thinking=False, think_end_id=None)
    params = [SamplingParams(max_tokens=120, temperature=0.0, grammar=grammar)] + [
        SamplingParams(max_tokens=120, temperature=1.0, seed=seed, grammar=grammar)
        for seed in range(3)
    ]
    outputs = engine.generate([prompt(tokenizer)] * len(params), params)
    for out in outputs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({out.text for out in outputs}) > 1  # sampling still samples, within the schema


def test_any_json_object_for_json_object(served):
    engine, tokenizer, _ = served
    grammar = grammar_for({"type": "json_object"}, thinking=False, think_end_id=None)
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=5, grammar=grammar)
    (out,) = engine.generate([prompt(tokenizer)], params)
    assert isinstance(json.loads(out.text), dict)


def test_unconstrained_requests_in_the_batch_are_untouched(served):
    engine, tokenizer, _ = served
    grammar = grammar_for(JSON_SCHEMA, thinking=False, think_end_id=None)
    plain = SamplingParams(max_tokens=12, temperature=0.0)
    (alone,) = engine.generate([prompt(tokenizer)], plain)
    mixed = engine.generate(
        [prompt(tokenizer)] * 3,
        [SamplingParams(max_tokens=12, temperature=0.0, grammar=grammar), plain, plain],
    )
    assert mixed[1].token_ids == mixed[2].token_ids == alone.token_ids
    assert mixed[0].token_ids != alone.token_ids


def test_a_grammar_the_engine_cannot_use_is_refused(served):
    engine, tokenizer, folder = served
    with pytest.raises(RequestError, match="grammar is not usable"):
        engine.add_request("bad", prompt(tokenizer), SamplingParams(grammar="start: nothing"))
    bare = local_engine(load_model(folder, dtype="float32", progress=False), EngineConfig())
    with pytest.raises(RequestError, match="needs the model's tokenizer"):
        bare.add_request("x", [1, 2], SamplingParams(grammar="start: answer\nanswer: %json {}"))


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        ({"type": "xml"}, "type 'xml' is not one of text, json_object, json_schema"),
        ({"type": "json_schema"}, "json_schema must be an object holding the schema"),
        ({"type": "json_schema", "json_schema": {"schema": []}}, "must be an object"),
        (
            {"type": "json_schema", "json_schema": {"schema": {"type": "object", "$ref": "#/x"}}},
            "cannot be enforced",
        ),
    ],
)
def test_a_bad_response_format_is_a_400_naming_it(response_format, message):
    with pytest.raises(APIError) as caught:
        grammar_for(response_format, thinking=False, think_end_id=None)
    assert caught.value.status == 400 and message in caught.value.body()["error"]["message"]


def test_text_asks_for_nothing():
    assert grammar_for({"type": "text"}, thinking=True, think_end_id=1) is None
    assert grammar_for(None, thinking=False, think_end_id=None) is None


def test_mask_bits_unpack_to_tokens():
    words = np.array([[0b101, -(1 << 31)]], dtype=np.int32)  # tokens 0, 2 and 63
    allowed = unpack(words, 66)
    assert allowed.nonzero()[1].tolist() == [0, 2, 63]
    assert allowed.shape == (1, 66)  # wider than the mask: the rest forbidden


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "days": {"type": "integer"},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                    "alerts": {"type": "boolean"},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_alarm",
            "parameters": {
                "type": "object",
                "properties": {"at": {"type": "object", "properties": {
                    "hour": {"type": "integer", "minimum": 0, "maximum": 23}},
                    "required": ["hour"], "additionalProperties": False}},
                "required": ["at"],
            },
        },
    },
]  # fmt: skip


@pytest.mark.parametrize(("choice", "parallel"), [(None, True), ("set_alarm", True), (None, False)])
def test_tool_choice_makes_the_random_model_call_tools_with_valid_arguments(
    served, choice, parallel
):
    engine, tokenizer, _ = served
    grammar = tool_grammar(TOOLS, choice, parallel, thinking=False, think_end_id=None)
    params = [
        SamplingParams(max_tokens=200, temperature=1.0, seed=s, grammar=grammar) for s in range(3)
    ]
    for out in engine.generate([prompt(tokenizer)] * 3, params):
        assert out.finish_reason == "stop", out.text
        content, calls = parse_tool_calls(out.text, TOOLS)
        assert content == "" and calls, out.text
        assert len(calls) == 1 or (parallel and choice is None)
        for call in calls:
            assert choice in (None, call.name)
            spec = next(
                t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.name
            )
            jsonschema.validate(json.loads(call.arguments), spec)
