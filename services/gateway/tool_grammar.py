"""`tool_choice` "required" or a named function, as a grammar in Step-3's tool-call format.

The output must be a block of calls (step3_tools.py has the format): one call of the named
function, or one or more calls of the offered tools ("required", parallel calls allowed
unless `parallel_tool_calls` is false). Each call's parameters follow its JSON schema: the
required ones in the schema's order, then any of the others, each value as the tool-call
parser reads it back (a string as raw text without `<`, a number, boolean or null as its
JSON literal, an object or array as JSON held to its own schema). A schema this cannot
spell (no properties listed) lets any parameters through, as text. As with
`response_format`, a prompt that opened a thinking section keeps it free up to its end.
"""

from __future__ import annotations

import json
from typing import Any

from services.gateway.step3_tools import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    INVOKE_END,
    SEP,
)
from services.gateway.structured import COMPACT, thinking_prefix, validated

NUMBER = r"/-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/"
INTEGER = r"/-?(0|[1-9][0-9]*)/"
TEXT = r"/[^<]*/"


def tool_grammar(
    tools: list[dict[str, Any]],
    choice: str | None,
    parallel: bool,
    thinking: bool,
    think_end_id: int | None,
) -> str:
    """The grammar for `tool_choice` "required" (`choice` None) or the function `choice`."""
    functions = [tool["function"] for tool in tools]
    if choice is not None:
        functions = [f for f in functions if f["name"] == choice]
    repeat = "call+" if parallel and choice is None else "call"
    rules = [f"calls: {_literal(CALLS_BEGIN + chr(10))} {repeat} {_literal(CALLS_END)}"]
    rules.append("call: " + " | ".join(f"call_{i}" for i in range(len(functions))))
    for i, function in enumerate(functions):
        rules += _call_rules(i, function)
    rules.append(
        f'any_param: "<steptml:parameter name=\\"" /[^"<]+/ "\\">" {TEXT} "</steptml:parameter>"'
    )
    start = f"start: {thinking_prefix(thinking, think_end_id)} calls"
    return validated("\n".join([start, *rules]) + "\n", "tool_choice")


def _call_rules(i: int, function: dict[str, Any]) -> list[str]:
    head = f'{CALL_BEGIN}function{SEP}<steptml:invoke name="{function["name"]}">'
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties")
    rules = []
    if not isinstance(properties, dict) or not properties:
        body = "" if isinstance(properties, dict) else "any_param*"  # {}: no parameters
    else:
        required = [n for n in parameters.get("required", []) if n in properties]
        optional = [n for n in properties if n not in required]
        parts = [f"p_{i}_{j}" for j, _ in enumerate(required)]
        parts += [f"p_{i}_{len(required) + j}?" for j, _ in enumerate(optional)]
        body = " ".join(parts)
        for j, name in enumerate([*required, *optional]):
            rules.append(f"p_{i}_{j}: {_parameter(name, properties[name])}")
    end = INVOKE_END + CALL_END + "\n"
    rules.insert(0, f"call_{i}: {_literal(head)} {body} {_literal(end)}")
    return rules


def _parameter(name: str, schema: Any) -> str:
    open_tag = _literal(f'<steptml:parameter name="{name}">')
    return f"{open_tag} {_value(schema)} {_literal('</steptml:parameter>')}"


def _value(schema: Any) -> str:
    """A parameter's value as the parser reads it back (step3_tools._typed)."""
    if not isinstance(schema, dict):
        return TEXT
    if "enum" in schema and all(isinstance(v, str) and "<" not in v for v in schema["enum"]):
        return "(" + " | ".join(_literal(v) for v in schema["enum"]) + ")"
    kind = schema.get("type")
    if kind == "string":
        limit = schema.get("maxLength")
        return TEXT if not isinstance(limit, int) else f"/[^<]{{0,{limit}}}/"
    if kind == "integer":
        return INTEGER
    if kind == "number":
        return NUMBER
    if kind == "boolean":
        return '("true" | "false")'
    if kind == "null":
        return '"null"'
    compact = {**schema, "x-guidance": COMPACT}
    return f"%json {json.dumps(compact, ensure_ascii=False)}"


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
