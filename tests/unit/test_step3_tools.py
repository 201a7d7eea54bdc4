"""Step-3's tool calls read from the model's output: whole, and streamed in any chunking,
which must give the same calls and the same content; arguments typed by the tool's schema."""

import json
import random

import pytest

from services.gateway.step3_tools import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    SEP,
    Arguments,
    CallStart,
    ToolCallParser,
    parse_tool_calls,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "units": {"type": ["string", "null"]},
                    "where": {"type": "object"},
                },
            },
        },
    },
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}},
]


def call(name: str, **parameters: str) -> str:
    params = "".join(
        f'\n<steptml:parameter name="{k}">{v}</steptml:parameter>' for k, v in parameters.items()
    )
    return (
        f'{CALL_BEGIN}function{SEP}<steptml:invoke name="{name}">{params}\n'
        f"</steptml:invoke>{CALL_END}"
    )


def block(*calls: str) -> str:
    return CALLS_BEGIN + "\n" + "\n".join(calls) + "\n" + CALLS_END


def streamed(text: str, sizes: list[int]) -> tuple[str, list, list]:
    """(content, calls, events) of `text` fed in pieces of the given sizes."""
    parser, events, start = ToolCallParser(TOOLS), [], 0
    for size in sizes:
        events += parser.feed(text[start : start + size])
        start += size
    events += parser.feed(text[start:]) + parser.finish()
    return "".join(e for e in events if isinstance(e, str)), parser.calls, events


def arguments_of(events: list, index: int) -> str:
    return "".join(e.text for e in events if isinstance(e, Arguments) and e.index == index)


WELL_FORMED = "Let me check." + block(call("get_weather", city="Paris", days="2"), call("now"))


def test_a_block_of_two_calls_and_the_text_before_it():
    content, calls = parse_tool_calls(WELL_FORMED, TOOLS)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 2}),
        ("now", {}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_text_after_the_block_is_content_too():
    content, calls = parse_tool_calls("a " + block(call("now")) + " b", TOOLS)
    assert content == "a  b" and [c.name for c in calls] == ["now"]


def test_no_block_is_all_content():
    text = "no calls here: <steptml:invoke name='x'> is just text"
    assert parse_tool_calls(text, TOOLS) == (text, [])


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ('He said "hi" \\ {x} \n<b>', 'He said "hi" \\ {x} \n<b>'),  # JSON-special, and a <
        ("  padded  ", "padded"),
        ("Zürich 東京", "Zürich 東京"),
    ],
)
def test_string_arguments_keep_every_character_and_stay_valid_json(raw, value):
    _, calls = parse_tool_calls(block(call("get_weather", city=raw)), TOOLS)
    assert json.loads(calls[0].arguments) == {"city": value}


def test_arguments_are_typed_by_the_schema():
    text = block(
        call("get_weather", city="123", days=" 7 ", units="null", where='{"lat": 1.5}', extra="[1]")
    )
    _, calls = parse_tool_calls(text, TOOLS)
    assert json.loads(calls[0].arguments) == {
        "city": "123",  # a string stays a string, even when it reads as a number
        "days": 7,
        "units": None,
        "where": {"lat": 1.5},
        "extra": [1],  # not in the schema: JSON when it parses
    }
    _, calls = parse_tool_calls(block(call("get_weather", days="seven")), TOOLS)
    assert json.loads(calls[0].arguments) == {"days": "seven"}  # not JSON: kept as text


def test_output_cut_short_keeps_the_completed_parameters_and_the_text():
    full = "ok" + block(call("get_weather", city="Paris", days="2"))
    cut = full[: full.index('<steptml:parameter name="days">') + 20]
    content, calls = parse_tool_calls(cut, TOOLS)
    assert content == "ok" and json.loads(calls[0].arguments) == {"city": "Paris"}
    # Cut inside the block marker: the text is content, not lost.
    assert parse_tool_calls("ok" + CALLS_BEGIN[:5], TOOLS) == ("ok" + CALLS_BEGIN[:5], [])
    # Cut before the first call's name is complete: no call, the rest is content.
    content, calls = parse_tool_calls("ok" + CALLS_BEGIN + CALL_BEGIN + "func", TOOLS)
    assert calls == [] and content.startswith("ok")


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13])
def test_every_fixed_chunking_streams_the_same_calls(size):
    whole_content, whole_calls = parse_tool_calls(WELL_FORMED, TOOLS)
    content, calls, events = streamed(WELL_FORMED, [size] * (len(WELL_FORMED) // size))
    assert content == whole_content
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
    # The pieces of each call's arguments join into its JSON object.
    for index, c in enumerate(calls):
        assert json.loads(arguments_of(events, index)) == json.loads(c.arguments)
    starts = [e for e in events if isinstance(e, CallStart)]
    assert [(s.index, s.name) for s in starts] == [(0, "get_weather"), (1, "now")]


def test_random_chunkings_stream_the_same_calls():
    rng = random.Random(0)
    text = (
        "pre "
        + block(
            call("get_weather", city='a "quoted" <city>', days="3"), call("get_weather", city="b")
        )
        + " post"
    )
    expected = parse_tool_calls(text, TOOLS)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(1, 30)))
        sizes = [b - a for a, b in zip([0, *cuts], cuts, strict=False)]
        content, calls, _ = streamed(text, sizes)
        assert content == expected[0]
        assert [c.arguments for c in calls] == [c.arguments for c in expected[1]]


def test_a_call_s_start_streams_as_soon_as_its_name_is_complete():
    parser = ToolCallParser(TOOLS)
    head = f'{CALLS_BEGIN}\n{CALL_BEGIN}function{SEP}<steptml:invoke name="get_weather">'
    assert parser.feed(head[:-1]) == []
    (start,) = parser.feed(head[-1])
    assert isinstance(start, CallStart) and start.name == "get_weather"
