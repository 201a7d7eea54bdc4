"""The gateway end to end: a real local cluster (`afd serve`), the gateway as a process in
front of it, and the official `openai` client as the oracle of the API's shape. Greedy output
is checked against the single-process engine on the same prompt ids.

One cluster and two gateways serve the whole module: the second has API keys, a single slot
per instance and no queue, for the 401 and 429 paths.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from services.common.tokenizer import Tokenizer
from services.common.wire.attention_client import AttentionClient
from tests.support.cluster import ROOT, Cluster, afd

openai = pytest.importorskip("openai")

API_KEY = "sk-test-key"
PROMPT = "Hello! Who are you?"
MESSAGES = [{"role": "user", "content": PROMPT}]


@dataclass
class Gateway:
    process: subprocess.Popen
    url: str
    lines: list[str]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_gateway(*args: str, timeout_s: float = 60.0) -> Gateway:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "services.gateway", "--port", "0", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lines: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            match = re.match(r"gateway serving on (\S+)", line)
            if match:
                found.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout_s) or not found:
        process.kill()
        raise RuntimeError("gateway did not start:\n" + "".join(lines[-40:]))
    return Gateway(process, found[0], lines)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    afd("init-checkpoint", str(folder), "--preset", "tiny", stdout=subprocess.DEVNULL).wait(120)
    return folder


@pytest.fixture(scope="module")
def cluster(checkpoint):
    cluster = Cluster("--model", str(checkpoint), "--dtype", "float32")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def controller_address(cluster) -> str:
    for line in cluster.lines:
        match = re.search(r"controller listening on (\S+)", line)
        if match:
            return match.group(1)
    raise AssertionError("no controller address in:\n" + "".join(cluster.lines))


@pytest.fixture(scope="module")
def gateway(checkpoint, cluster, controller_address):
    # A generous SLA: a CPU's TPOT must not throttle the concurrency tests.
    attention = [a for address in cluster.addresses for a in ("--attention", address)]
    gateway = start_gateway(
        "--model",
        str(checkpoint),
        *attention,
        "--controller",
        controller_address,
        "--tpot-sla-ms",
        "10000",
    )
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def strict_gateway(checkpoint, cluster, tmp_path_factory):
    """Keys required, one running request per instance, no queue."""
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("sk-from-file\n\n")
    attention = [a for address in cluster.addresses for a in ("--attention", address)]
    gateway = start_gateway(
        "--model",
        str(checkpoint),
        *attention,
        "--api-key",
        API_KEY,
        "--api-key-file",
        str(keys),
        "--max-running",
        "1",
        "--max-queue",
        "0",
        "--served-model-name",
        "strict",
    )
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_name(checkpoint) -> str:
    return checkpoint.name


@pytest.fixture(scope="module")
def tokenizer(checkpoint) -> Tokenizer:
    return Tokenizer.from_dir(checkpoint)


def raw_post(gateway: Gateway, path: str, body: bytes, headers: dict | None = None):
    """Status, headers and the JSON body of a POST sent as given."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        return response.status, response.headers, json.loads(data or b"null")
    finally:
        conn.close()


def raw_get(gateway: Gateway, path: str, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


# The API's shape.


def test_models_lists_the_served_model(client, model_name):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]


def test_chat_completion_has_text_and_usage(client, model_name):
    reply = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=8, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("length", "stop")
    assert reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completion_accepts_every_prompt_form(client, model_name, tokenizer):
    ids = tokenizer.encode(PROMPT, add_special_tokens=True)
    as_text = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=6, temperature=0
    )
    as_ids = client.completions.create(model=model_name, prompt=ids, max_tokens=6, temperature=0)
    batch = client.completions.create(
        model=model_name, prompt=[PROMPT, "Other"], max_tokens=6, temperature=0
    )
    id_batch = client.completions.create(
        model=model_name, prompt=[ids, ids[:3]], max_tokens=6, temperature=0
    )
    assert as_text.choices[0].text == as_ids.choices[0].text
    assert as_text.usage.prompt_tokens == len(ids)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == as_text.choices[0].text
    assert id_batch.choices[0].text == as_text.choices[0].text
    assert id_batch.usage.prompt_tokens == len(ids) + 3


def test_greedy_equals_the_single_process_engine(client, model_name, checkpoint, tokenizer):
    from services.attention.builder import local_engine
    from services.attention.engine import EngineConfig
    from services.common.model.build import load_model
    from services.common.sampling_params import SamplingParams

    engine = local_engine(
        load_model(checkpoint, dtype="float32", progress=False), EngineConfig(), tokenizer
    )
    chat_ids = tokenizer.encode_chat(MESSAGES)
    text_ids = tokenizer.encode(PROMPT, add_special_tokens=True)
    expected = engine.generate([chat_ids, text_ids], SamplingParams(max_tokens=12, temperature=0.0))
    chat = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=12, temperature=0
    )
    text = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0)
    assert chat.usage.prompt_tokens == len(chat_ids)
    assert chat.usage.completion_tokens == len(expected[0].token_ids)
    assert chat.choices[0].message.content == expected[0].text
    assert text.usage.completion_tokens == len(expected[1].token_ids)
    assert text.choices[0].text == expected[1].text


def test_penalties_reach_the_engine(client, model_name, checkpoint, tokenizer):
    from services.attention.builder import local_engine
    from services.attention.engine import EngineConfig
    from services.common.model.build import load_model
    from services.common.sampling_params import SamplingParams

    engine = local_engine(
        load_model(checkpoint, dtype="float32", progress=False), EngineConfig(), tokenizer
    )
    ids = tokenizer.encode(PROMPT, add_special_tokens=True)
    penalised = SamplingParams(
        max_tokens=24, temperature=0.0, presence_penalty=-2.0, frequency_penalty=-2.0
    )
    plain, expected = engine.generate(
        [ids, ids], [SamplingParams(max_tokens=24, temperature=0.0), penalised]
    )
    text = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=24, temperature=0,
        presence_penalty=-2.0, frequency_penalty=-2.0,
    ).choices[0].text  # fmt: skip
    assert text == expected.text
    assert expected.token_ids != plain.token_ids  # the penalties changed something


def test_stream_joins_to_the_whole_text_and_ends_with_usage(client, model_name):
    whole = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=10, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=model_name,
            messages=MESSAGES,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_stream_joins_to_the_whole_text(client, model_name):
    whole = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(
        client.completions.create(
            model=model_name,
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_with_seeds(client, model_name):
    kwargs = dict(model=model_name, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=7)
    first = client.chat.completions.create(n=2, **kwargs)
    again = client.chat.completions.create(n=2, **kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    # Choice i samples with seed + i: the second choice is the first of a request seeded 8.
    shifted = client.chat.completions.create(**{**kwargs, "seed": 8})
    assert shifted.choices[0].message.content == texts[1]
    assert 2 <= first.usage.completion_tokens <= 16


def test_stop_string_ends_the_text_before_it(client, model_name):
    whole = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=16, temperature=0
    ).choices[0]
    middle = len(whole.text) // 2
    stop = whole.text[middle : middle + 3]
    stopped = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop, "\x00never"]
    ).choices[0]
    assert stopped.text == whole.text[: whole.text.index(stop)]
    assert stopped.finish_reason == "stop"


def test_logprobs(client, model_name):
    chat = client.chat.completions.create(
        model=model_name,
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.logprob <= 0
    text = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2
    ).choices[0]
    assert len(text.logprobs.tokens) == len(text.logprobs.token_logprobs) == 5
    assert all(len(top) <= 2 for top in text.logprobs.top_logprobs)
    assert text.logprobs.text_offset[0] == 0


def test_concurrent_streams_equal_sequential_ones(client, model_name):
    prompts = [f"Request number {i}: tell me about item {i * 7}" for i in range(64)]

    def one(prompt: str) -> str:
        stream = client.completions.create(
            model=model_name, prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in stream if c.choices)

    sequential = [one(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(one, prompts))
    assert concurrent == sequential


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "whole"])
def test_a_disconnect_frees_the_requests_blocks(gateway, cluster, model_name, stream):
    body = json.dumps(
        {
            "model": model_name,
            "prompt": PROMPT * 20,
            "max_tokens": 3000,
            "ignore_eos": True,
            "temperature": 0,
            "stream": stream,
        }
    ).encode()
    with grpc.insecure_channel(cluster.addresses[0]) as channel:
        attention = AttentionClient(channel)
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        if stream:
            response = conn.getresponse()
            assert response.status == 200
            assert response.readline().startswith(b"data: ")
        deadline = time.monotonic() + 20
        while (load := attention.load()).num_running == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert load.num_running >= 1
        assert load.num_free_blocks < load.num_total_blocks
        conn.sock.close()
        conn.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            load = attention.load()
            if load.num_running == 0 and load.num_free_blocks == load.num_total_blocks:
                break
            time.sleep(0.1)
        assert load.num_running == 0
        assert load.num_free_blocks == load.num_total_blocks


# Errors: status, OpenAI's shape, and a message that says what to change.


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


def test_ready_is_503_when_an_instance_is_missing(checkpoint, cluster):
    lonely = start_gateway(
        "--model",
        str(checkpoint),
        "--attention",
        cluster.addresses[0],
        "--attention",
        "127.0.0.1:1",
    )
    try:
        status, body = raw_get(lonely, "/ready")
        assert status == 503
        assert body["not_ready"] == ["attention 127.0.0.1:1"]
    finally:
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
