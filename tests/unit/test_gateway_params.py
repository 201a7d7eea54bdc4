"""What the gateway asks the engine for, from a request body (services/gateway/protocol.py)."""

from __future__ import annotations

import json

from services.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    parse,
    sampling_params,
)

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def params(model, body: dict):
    return sampling_params(parse(model, json.dumps(body).encode()), max_tokens=4)


def test_offered_tools_keep_special_tokens_in_the_text_the_tool_parser_reads():
    """Step-3's tool-call markers may be special tokens: skipping them would hide the calls."""
    assert params(ChatCompletionRequest, {**CHAT, "tools": [TOOL]}).skip_special_tokens is False
    offered_none = {**CHAT, "tools": [TOOL], "tool_choice": "none"}
    assert params(ChatCompletionRequest, offered_none).skip_special_tokens is True
    assert params(ChatCompletionRequest, CHAT).skip_special_tokens is True
    asked = {**CHAT, "skip_special_tokens": False}
    assert params(ChatCompletionRequest, asked).skip_special_tokens is False
    assert params(CompletionRequest, {"model": "m", "prompt": "hi"}).skip_special_tokens is True
