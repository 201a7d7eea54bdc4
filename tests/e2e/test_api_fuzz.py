"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis).

A real local cluster (`afd serve`, the tiny checkpoint) and a gateway that requires an API key.
For every operation of `/openapi.json`, schemathesis generates requests that fit the schema
and requests that break it, sent with the key and without it. The oracle, for each answer:
no 5xx; every refusal is JSON in OpenAI's error shape with a message; every answer fits the
schema where the schema declares it (schemathesis' own checks); a body that breaks the schema
is refused; a stream ends with `[DONE]` and carries no server error. A second property test
sends `Authorization` headers of arbitrary bytes (schemathesis makes up ASCII ones only).
Afterwards the stack must still answer a plain request and hold no running request and no KV
block. docs/reliability.md says what the fuzzing found.

The seed is fixed (`derandomize`), so a run is reproducible; generated `max_tokens` are kept
small (`SMALL`, and `n` too) so that a few thousand requests take minutes on a CPU.
"""

from __future__ import annotations

import http.client
import json
import math
import time
import urllib.request
from collections import Counter

import grpc
import pytest

from services.common.wire.attention_client import AttentionClient
from services.gateway.protocol import MAX_N
from tests.support.cluster import CLUSTER_SECRET
from tests.support.gateway import API_KEY, MESSAGES, raw_get, raw_post, start_gateway

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

# What generated requests ask for at most, where the schema allows at most the second number.
SMALL = {"max_tokens": (4, math.inf), "max_completion_tokens": (4, math.inf), "n": (4, MAX_N)}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
GENERATE = "/v1/chat/completions", "/v1/completions"
# (path, method, mode, with the key, examples): valid requests with the key generate tokens
# (the slow ones); the rest are refused before generation.
RUNS = [
    *[(path, "post", GenerationMode.POSITIVE, True, 150) for path in GENERATE],
    *[(path, "post", GenerationMode.NEGATIVE, True, 300) for path in GENERATE],
    *[(path, "post", mode, False, 200) for path in GENERATE for mode in GenerationMode],
    *[("/v1/models", "get", mode, key, 100) for mode in GenerationMode for key in (True, False)],
    *[(path, "get", GenerationMode.POSITIVE, False, 20) for path in ("/health", "/ready")],
    ("/metrics", "get", GenerationMode.POSITIVE, False, 20),
]


@pytest.fixture(scope="module")
def fuzzed(checkpoint, cluster):
    attention = [a for address in cluster.addresses for a in ("--attention", address)]
    gateway = start_gateway(
        "--model", str(checkpoint), *attention, "--api-key", API_KEY, "--tpot-sla-ms", "10000"
    )
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def schema(fuzzed):
    return schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")


@pytest.fixture(scope="module")
def tally() -> Counter:
    """Answers by (path, mode, status), over the whole module."""
    return Counter()


def test_the_schema_describes_every_route_and_the_request_bodies(fuzzed):
    status, schema = raw_get(fuzzed, "/openapi.json")
    assert status == 200
    paths = schema["paths"]
    for path in ("/v1/models", "/health", "/ready", "/metrics"):
        assert "get" in paths[path], path
    for path, name in zip(GENERATE, ("ChatCompletionRequest", "CompletionRequest"), strict=True):
        operation = paths[path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"}
        assert operation["security"] == [{"apiKey": []}]
    schemas = schema["components"]["schemas"]
    assert "messages" in schemas["ChatCompletionRequest"]["required"]
    assert schemas["CompletionRequest"]["properties"]["n"]["maximum"] == 64
    assert schema["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"


@pytest.mark.parametrize(
    "path, method, mode, with_key, examples",
    RUNS,
    ids=[f"{m}-{p}-{mode.value}-{'key' if k else 'nokey'}" for p, m, mode, k, _ in RUNS],
)
def test_no_generated_request_gets_a_server_error(
    fuzzed, schema, tally, path, method, mode, with_key, examples
):
    operation = schema[path][method.upper()]
    headers = {"Authorization": f"Bearer {API_KEY}"} if with_key else {}

    @given(case=operation.as_strategy(generation_mode=mode).map(kept_small))
    @settings(
        max_examples=examples,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        # Without the key, the case keeps the Authorization header schemathesis makes up for
        # the security scheme (never the key), or leaves it out in a negative case.
        response = case.call(base_url=fuzzed.url, headers=headers, timeout=120)
        tally[path, mode.value, response.status_code] += 1
        assert response.status_code < 500, describe(case, response)
        if path.startswith("/v1/") and not with_key:
            assert response.status_code == 401, describe(case, response)
        if response.status_code >= 400:
            check_error(response.json(), case, response)
        elif "text/event-stream" in response.headers.get("content-type", ""):
            check_stream(response.text, case, response)
        case.validate_response(response, checks=CHECKS, headers=headers)

    run()


def test_no_authorization_header_breaks_the_key_check(fuzzed):
    """Any bytes a header can carry, with the scheme or without: 401, never a 500 (schemathesis
    makes up ASCII keys only; a non-ASCII one used to crash `hmac.compare_digest`)."""

    @given(scheme=st.sampled_from([b"Bearer ", b"bearer ", b"", b"Basic "]), key=HEADER_BYTES)
    @settings(
        max_examples=300,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(scheme: bytes, key: bytes) -> None:
        status, body = get_with_authorization(fuzzed, "/v1/models", scheme + key)
        if scheme.lower() == b"bearer " and key.strip() == API_KEY.encode():
            assert status == 200, body
        else:
            assert status == 401, (scheme + key, body)
            assert body["error"]["code"] == "invalid_api_key", body

    run()


# What the fuzzer (and the hand-made requests beside it) found, each kept fixed: the request,
# then the status, the `param` and a piece of the message it must get.
CHAT, TEXT = GENERATE
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
FOUND = [
    (TEXT, {"prompt": "x", "seed": 1 << 64}, 400, "seed", "less than or equal to"),
    (TEXT, {"prompt": "x", "top_k": 1 << 80}, 400, "top_k", "less than or equal to"),
    (TEXT, {"prompt": "x", "max_tokens": 2, "seed": (1 << 63) - 1, "n": 2}, 200, None, ""),
    (TEXT, {"prompt": "x", "max_tokens": 2.0, "n": 2.0}, 200, None, ""),
    (TEXT, [{"prompt": "x"}], 400, None, "must be a JSON object"),
    (TEXT, {"prompt": [[1]] * 100, "n": 3}, 400, "prompt", "at most 256"),
    (TEXT, {"prompt": [5, -1]}, 400, "prompt", "'prompt.1'"),
    (TEXT, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "only useful with echo"),
    (TEXT, {"prompt": "x", "echo": True, "max_tokens": 2}, 200, None, ""),
    (TEXT, {"prompt": "x y", "echo": True, "max_tokens": 0, "logprobs": 1}, 200, None, ""),
    (TEXT, {"prompt": "x", "logit_bias": {"x": 5}}, 400, "logit_bias", "not a token id"),
    (TEXT, {"prompt": "x", "logit_bias": {"1": 500}}, 400, "logit_bias", "[-100, 100]"),
    (TEXT, {"prompt": "x", "max_tokens": 1, "logit_bias": {"1": 5}}, 200, None, ""),
    (
        CHAT,
        {"messages": MESSAGES, "tools": [{"type": "function"}]},
        400,
        "tools.0.function",
        "is required",
    ),
    (
        CHAT,
        {
            "messages": MESSAGES,
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        400,
        "tool_choice",
        "not among the tools",
    ),
    (CHAT, {"messages": MESSAGES, "tool_choice": "auto"}, 400, "tool_choice", "add tools"),
    (
        CHAT,
        {"messages": MESSAGES, "chat_template_kwargs": {"messages": []}},
        400,
        "messages",
        "may not set messages",
    ),
    (
        CHAT,
        {"messages": MESSAGES, "response_format": {"type": "yaml"}},
        400,
        "response_format",
        "not one of text, json_object, json_schema",
    ),
    (
        CHAT,
        {"messages": MESSAGES, "max_tokens": 8, "response_format": {"type": "json_object"}},
        200,
        None,
        "",
    ),  # fmt: skip
    (
        CHAT,
        {"messages": [{"role": "tool", "content": "x"}]},
        400,
        "messages.0.tool_call_id",
        "is required",
    ),
    (CHAT, {"messages": [{"role": "critic", "content": "x"}]}, 400, "messages.0", "'user'"),
    (CHAT, {"messages": [{"content": "x"}]}, 400, "messages.0.role", "is required"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "messages.0.content",
        "'text'",
    ),
]


@pytest.mark.parametrize("path, body, status, param, words", FOUND)
def test_what_the_fuzzer_found_stays_fixed(fuzzed, path, body, status, param, words):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    got, _, reply = raw_post(fuzzed, path, json.dumps(body).encode(), headers)
    assert got == status, reply
    if status != 200:
        assert reply["error"]["param"] == param, reply
        assert words in reply["error"]["message"], reply


def test_the_stack_still_serves_and_holds_nothing(fuzzed, cluster, tally):
    body = json.dumps({"messages": MESSAGES, "max_tokens": 4}).encode()
    status, _, reply = raw_post(
        fuzzed, "/v1/chat/completions", body, {"Authorization": f"Bearer {API_KEY}"}
    )
    assert status == 200, reply
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")
    for address in cluster.addresses:
        with grpc.insecure_channel(address) as channel:
            attention = AttentionClient(channel, CLUSTER_SECRET)
            deadline = time.monotonic() + 20
            while (load := attention.load()).num_running and time.monotonic() < deadline:
                time.sleep(0.1)
        assert (load.num_running, load.num_waiting) == (0, 0), address
        assert load.num_free_blocks == load.num_total_blocks, address
    metrics = raw_text(fuzzed, "/metrics")
    assert "afd_gateway_requests_running 0.0" in metrics
    assert "afd_gateway_requests_waiting 0.0" in metrics
    if len({key[:2] for key in tally}) == len({(p, mode.value) for p, _, mode, _, _ in RUNS}):
        total = sum(tally.values())
        print(f"fuzzed {total} requests: {sorted(tally.items())}")
        assert total >= 2000
        generated = sum(n for (p, _, status), n in tally.items() if p in GENERATE and status == 200)
        assert generated >= 200  # the fuzzer reaches generation, not only the validation


def kept_small(case):
    """`case` asking for at most `SMALL` tokens and choices where it asks for a valid number
    of them (an invalid number is what a negative case tests, so it stays)."""
    body = case.body
    if not isinstance(body, dict):
        return case
    for name, (small, most) in SMALL.items():
        value = body.get(name)
        whole = isinstance(value, int | float) and not isinstance(value, bool) and value % 1 == 0
        if whole and small < value <= most:
            body[name] = small
    if all(body.get(name) is None for name in ("max_tokens", "max_completion_tokens")):
        body["max_tokens"] = SMALL["max_tokens"][0]  # chat's default is the whole context
    return case


def check_error(body, case, response) -> None:
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict), describe(case, response)
    assert isinstance(error.get("message"), str) and error["message"], describe(case, response)
    assert "Traceback" not in error["message"], describe(case, response)
    assert error.get("type") != "server_error", describe(case, response)


def check_stream(text: str, case, response) -> None:
    events = [line[len("data: ") :] for line in text.split("\n\n") if line]
    assert events and events[-1] == "[DONE]", describe(case, response)
    for event in events[:-1]:
        chunk = json.loads(event)
        if "error" in chunk:
            check_error(chunk, case, response)
        else:
            assert chunk["object"] in ("chat.completion.chunk", "text_completion"), event


def describe(case, response) -> str:
    sent = f"{case.method} {case.path} {case.body!r:.2000}"
    return f"{sent} -> {response.status_code} {response.text:.2000}"


# What an HTTP header value can hold (RFC 9110's field-value): visible ASCII, obs-text (0x80
# and up), space and tab. Other control bytes are refused by uvicorn before the app, a 400.
HEADER_BYTES = st.lists(
    st.sampled_from([9, *range(0x20, 0x7F), *range(0x80, 0x100)]), max_size=48
).map(bytes)


def get_with_authorization(gateway, path: str, authorization: bytes):
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    try:
        conn.putrequest("GET", path)
        conn.putheader("Authorization", authorization)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def raw_text(gateway, path: str) -> str:
    with urllib.request.urlopen(gateway.url + path, timeout=30) as answer:
        return answer.read().decode()
