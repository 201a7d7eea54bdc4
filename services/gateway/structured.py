"""`response_format` as a grammar the attention instance enforces token by token.

`json_object` asks for any JSON object, `json_schema` for one that satisfies the given schema
(always strictly: a schema is enforced, never hoped for). The schema is compiled to an
llguidance grammar here, where a bad one is refused with a 400 before any instance sees it;
the attention instance masks every step's tokens to what the grammar allows
(services/attention/grammar.py).

A prompt that leaves a thinking section open (Step-3's) keeps its thinking free: the grammar
lets any text through up to the end of the section, then the JSON. Without the section, the
output is the JSON from its first token.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

from services.gateway.errors import APIError, invalid
from services.gateway.reasoning import THINK_END

COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_for(
    response_format: dict[str, Any] | None, thinking: bool, think_end_id: int | None
) -> str | None:
    """The grammar of a request's `response_format` (None: plain text). `thinking`: the
    prompt left a thinking section open; `think_end_id`: `</think>`'s token id, when it is
    one token (it may be written either way)."""
    schema = _schema(response_format)
    if schema is None:
        return None
    # Compact JSON (", " and ": " between items, no other whitespace): a model that likes
    # whitespace could otherwise spend its whole budget on it inside the object.
    compact = {**schema, "x-guidance": {**COMPACT, **schema.get("x-guidance", {})}}
    answer = f"%json {json.dumps(compact, ensure_ascii=False)}"
    grammar = f"start: {thinking_prefix(thinking, think_end_id)} answer\nanswer: {answer}\n"
    return validated(grammar, "response_format")


def thinking_prefix(thinking: bool, think_end_id: int | None) -> str:
    """What a grammar lets through before the answer: the rest of an open thinking section
    (any text, then its end, either as `</think>`'s one token or as text), or nothing."""
    if not thinking:
        return ""
    end = json.dumps(THINK_END)
    if think_end_id is not None:
        end = f"(<[{think_end_id}]> | {end})"
    return f"/(?s:.*?)/ {end} /\\s*/"


def validated(grammar: str, param: str) -> str:
    """`grammar`, once llguidance accepts it; else a 400 naming `param`."""
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise invalid(f"{param}: the grammar it asks for cannot be enforced: {error}", param=param)
    return grammar


def _schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise _bad_format(
            f"type {kind!r} is not one of text, json_object, json_schema",
        )
    spec = response_format.get("json_schema")  # type: ignore[union-attr]
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise _bad_format(
            'json_schema must be an object holding the schema: {"name": ..., "schema": {...}}'
        )
    return spec.get("schema") or {}


def _bad_format(why: str) -> APIError:
    return invalid(f"response_format: {why}", param="response_format")
