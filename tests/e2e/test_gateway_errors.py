"""The gateway's refusals, each with its status and a message that says what to change:
bad JSON and parameters, unknown model, too long a prompt, too large a body, missing API
keys, a full queue, an instance that is not ready."""

from __future__ import annotations

import http.client
import json

import grpc
import pytest

from tests.support.gateway import API_KEY, MESSAGES, PROMPT, raw_get, raw_post, start_gateway

openai = pytest.importorskip("openai")


def test_malformed_json_is_400(gateway):
    status, _, body = raw_post(gateway, "/v1/chat/completions", b'{"messages": [')
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert "JSON" in body["error"]["message"]


def test_a_bad_parameter_is_400_naming_it(client, model_name):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=5)
    error = caught.value.body
    assert error["param"] == "temperature"
    assert "temperature" in error["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model_name, prompt=PROMPT, max_tokens=0)
    assert caught.value.body["param"] == "max_tokens"


def test_wrong_types_are_400(gateway, model_name):
    for field, value in (("temperature", "hot"), ("n", 1.5), ("stream", "yes"), ("stop", [1])):
        body = json.dumps({"model": model_name, "prompt": PROMPT, field: value}).encode()
        status, _, reply = raw_post(gateway, "/v1/completions", body)
        assert status == 400, (field, reply)
        assert reply["error"]["param"] == field


def test_unknown_fields_are_ignored(gateway, model_name):
    body = {"model": model_name, "prompt": PROMPT, "max_tokens": 2, "user": "u", "whatever": 1}
    status, _, reply = raw_post(gateway, "/v1/completions", json.dumps(body).encode())
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] <= 2


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-17", messages=MESSAGES)
    assert caught.value.body["code"] == "model_not_found"
    assert "gpt-17" in caught.value.body["message"]


def test_too_long_a_prompt_is_context_length_exceeded(client, model_name, tokenizer):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model_name, prompt=[1] * 4000, max_tokens=200)
    assert caught.value.body["code"] == "context_length_exceeded"
    assert "4096" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "hi " * 5000}]
        )
    assert caught.value.body["code"] == "context_length_exceeded"


def test_a_body_too_large_is_413(gateway, model_name):
    body = json.dumps({"model": model_name, "prompt": "x" * (2 << 20)}).encode()
    status, _, reply = raw_post(gateway, "/v1/completions", body)
    assert status == 413
    assert "bytes" in reply["error"]["message"]


def test_api_keys_guard_v1_only(strict_gateway):
    base = strict_gateway.url + "/v1"
    denied = openai.OpenAI(base_url=base, api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        denied.models.list()
    assert "API key" in caught.value.body["message"]
    status, body = raw_get(strict_gateway, "/v1/models")
    assert status == 401
    assert "Authorization: Bearer" in body["error"]["message"]
    status, _, body = raw_post(strict_gateway, "/v1/completions", b'{"prompt": "x"}')
    assert status == 401
    for key in (API_KEY, "sk-from-file"):
        allowed = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
        assert [m.id for m in allowed.models.list().data] == ["strict"]
    assert raw_get(strict_gateway, "/health")[0] == 200


def test_a_full_queue_is_429_with_retry_after(strict_gateway):
    body = json.dumps(
        {"prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    ).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    holder = http.client.HTTPConnection("127.0.0.1", strict_gateway.port, timeout=60)
    try:
        holder.request("POST", "/v1/completions", body, headers)
        response = holder.getresponse()
        assert response.status == 200
        response.readline()
        status, reply_headers, reply = raw_post(
            strict_gateway, "/v1/completions", body, {"Authorization": f"Bearer {API_KEY}"}
        )
        assert status == 429
        assert int(reply_headers["Retry-After"]) >= 1
        assert reply["error"]["type"] == "rate_limit_error"
    finally:
        holder.sock.close()
        holder.close()


def test_health_and_ready(gateway):
    assert raw_get(gateway, "/health") == (200, {"status": "ok"})
    assert raw_get(gateway, "/ready") == (200, {"status": "ready"})


def test_ready_names_a_missing_instance_and_is_503_only_when_none_can_serve(checkpoint, cluster):
    degraded = start_gateway(
        "--model", str(checkpoint), "--attention", cluster.addresses[0],
        "--attention", "127.0.0.1:1",
    )  # fmt: skip
    lonely = start_gateway("--model", str(checkpoint), "--attention", "127.0.0.1:1")
    try:
        status, body = raw_get(degraded, "/ready")
        assert (status, body) == (200, {"status": "ready", "degraded": ["attention 127.0.0.1:1"]})
        status, body = raw_get(lonely, "/ready")
        assert status == 503
        assert body["not_ready"] == ["attention 127.0.0.1:1"]
    finally:
        degraded.stop()
        lonely.stop()


# The parts that need no cluster.


def test_the_concurrency_limit_backs_off_over_the_sla_and_creeps_up_under_it():
    from services.gateway.admission import ConcurrencyLimit, LimitConfig

    config = LimitConfig(tpot_sla_s=0.05, initial=8, interval_s=1.0, min_samples=4)
    limit = ConcurrencyLimit(config, now=0.0)
    for i in range(4):
        limit.record(0.2, num_running=8, now=1.0 + i)  # 4x the SLA
    assert limit.limit == 6  # 8 * 0.75
    for i in range(8):
        limit.record(0.01, num_running=6, now=10.0 + i)
    assert 6 < limit.limit <= 6 + 8
    idle = ConcurrencyLimit(config, now=0.0)
    for i in range(8):
        idle.record(0.01, num_running=1, now=1.0 + i)  # under the SLA but not using the cap
    assert idle.limit == 8


def test_an_instance_refusal_becomes_a_400_with_its_message():
    from services.gateway.errors import from_rpc_error

    class Refusal(grpc.RpcError):
        def __init__(self, code, details):
            self._code, self._details = code, details

        def code(self):
            return self._code

        def details(self):
            return self._details

    too_long = (
        "the prompt has 5000 tokens; this model serves at most 4096 tokens including the output"
    )
    error = from_rpc_error(Refusal(grpc.StatusCode.INVALID_ARGUMENT, too_long))
    assert (error.status, error.code, error.message) == (400, "context_length_exceeded", too_long)
    error = from_rpc_error(Refusal(grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1]"))
    assert (error.status, error.code, error.message) == (400, None, "top_p must be in (0, 1]")
    assert from_rpc_error(Refusal(grpc.StatusCode.UNAVAILABLE, "stopping")).status == 503
