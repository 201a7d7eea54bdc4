"""The gateway end to end: a real local cluster (`afd serve`), the gateway as a process in
front of it, and the official `openai` client as the oracle of the API's shape. Greedy output
is checked against the single-process engine on the same prompt ids.

Fixtures (the cluster, the gateways, the oracle engine) are in conftest.py; errors in
test_gateway_errors.py; reasoning, tool calls and structured output in
test_gateway_structured.py.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from services.common.wire.attention_client import AttentionClient
from tests.support.cluster import CLUSTER_SECRET
from tests.support.gateway import MESSAGES, NO_THINKING, PROMPT

# The API's shape.


def test_models_lists_the_served_model(client, model_name):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]


def test_chat_completion_has_text_and_usage(client, model_name):
    reply = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=8, temperature=0, extra_body=NO_THINKING
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


def test_greedy_equals_the_single_process_engine(client, model_name, engine, tokenizer):
    from services.common.sampling_params import SamplingParams

    chat_ids = tokenizer.encode_chat(MESSAGES, template_kwargs=NO_THINKING["chat_template_kwargs"])
    text_ids = tokenizer.encode(PROMPT, add_special_tokens=True)
    expected = engine.generate([chat_ids, text_ids], SamplingParams(max_tokens=12, temperature=0.0))
    chat = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=12, temperature=0, extra_body=NO_THINKING
    )
    text = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0)
    assert chat.usage.prompt_tokens == len(chat_ids)
    assert chat.usage.completion_tokens == len(expected[0].token_ids)
    assert chat.choices[0].message.content == expected[0].text
    assert text.usage.completion_tokens == len(expected[1].token_ids)
    assert text.choices[0].text == expected[1].text


def test_penalties_reach_the_engine(client, model_name, engine, tokenizer):
    from services.common.sampling_params import SamplingParams

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
        model=model_name, messages=MESSAGES, max_tokens=10, temperature=0, extra_body=NO_THINKING
    )
    chunks = list(
        client.chat.completions.create(
            model=model_name,
            messages=MESSAGES,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=NO_THINKING,
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
    kwargs = dict(
        model=model_name, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=7,
        extra_body=NO_THINKING,
    )  # fmt: skip
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


def test_a_streamed_stop_string_is_never_streamed_in_part(client, model_name):
    whole = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=16, temperature=0
    ).choices[0]
    stop = whole.text[len(whole.text) // 3 :][:4]
    chunks = list(
        client.completions.create(
            model=model_name, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
            stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == whole.text[: whole.text.index(stop)]  # no piece of it came out
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert 0 < chunks[-1].usage.completion_tokens <= 16


def attention_generated_tokens(cluster) -> float:
    """Tokens the cluster's attention instances have generated, from their metrics."""
    line = next(x for x in cluster.lines if x.startswith("metrics at "))
    total = 0.0
    for address in line.split()[2:]:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
            body = reply.read().decode()
        total += sum(
            float(x.split()[-1])
            for x in body.splitlines()
            if x.startswith("afd_attention_generation_tokens_total")
        )
    return total


def test_a_matched_stop_string_ends_the_request_on_the_instance(client, cluster, model_name):
    kwargs = dict(model=model_name, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(max_tokens=8, **kwargs).choices[0].text
    stop = text[-4:]
    before = attention_generated_tokens(cluster)
    stopped = client.completions.create(max_tokens=3000, stop=[stop], **kwargs).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[: text.index(stop)]
    for address in cluster.addresses:
        with grpc.insecure_channel(address) as channel:
            load = wait_until_freed(AttentionClient(channel, CLUSTER_SECRET))
            assert load.num_running == 0 and load.num_free_blocks == load.num_total_blocks
    # Cancelled by the gateway when the stop string matched, not run to its 3000 tokens.
    assert attention_generated_tokens(cluster) - before < 100


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
        attention = AttentionClient(channel, CLUSTER_SECRET)
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
        load = wait_until_freed(attention)
        assert load.num_running == 0
        assert load.num_free_blocks == load.num_total_blocks


# Errors: status, OpenAI's shape, and a message that says what to change.


def test_logit_bias_forces_a_token(client, model_name, tokenizer):
    token = 1234
    forced = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={token: 100}
    )
    assert forced.choices[0].text == tokenizer.decode([token] * 4)
    plain = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4, temperature=0)
    assert plain.choices[0].text != forced.choices[0].text


def test_usage_counts_the_prompt_tokens_found_in_the_prefix_cache(client, model_name):
    prompt = "A long shared preamble that fills several KV blocks. " * 8
    first = client.completions.create(model=model_name, prompt=prompt, max_tokens=1)
    again = client.completions.create(model=model_name, prompt=prompt, max_tokens=1)
    blocks = again.usage.prompt_tokens // 16  # the cache holds whole blocks of 16 tokens
    assert first.usage.prompt_tokens_details.cached_tokens <= again.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens >= 16 * (blocks - 1) > 0


def test_echo_returns_the_prompt_s_logprobs_as_the_reference_scores_them(
    client, model_name, engine, tokenizer
):
    from services.common.sampling_params import SamplingParams

    ids = tokenizer.encode(PROMPT, add_special_tokens=True)
    (expected,) = engine.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=2))
    scored = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2
    )
    choice = scored.choices[0]
    assert choice.text == PROMPT and scored.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in ids]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(
        [lp.logprob for lp in expected.prompt_logprobs], abs=1e-4
    )
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs[1:])
    both = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=3, echo=True, logprobs=0, temperature=0
    ).choices[0]
    assert both.text.startswith(PROMPT) and len(both.logprobs.tokens) == len(ids) + 3


def test_a_streamed_echo_joins_to_the_whole_one(client, model_name):
    ask = dict(model=model_name, prompt=PROMPT, echo=True, logprobs=1, temperature=0)
    for max_tokens in (0, 3):
        whole = client.completions.create(**ask, max_tokens=max_tokens).choices[0]
        chunks = [
            c.choices[0]
            for c in client.completions.create(**ask, max_tokens=max_tokens, stream=True)
            if c.choices
        ]
        assert "".join(c.text for c in chunks) == whole.text
        tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
        scores = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
        assert tokens == whole.logprobs.tokens
        assert scores == pytest.approx(whole.logprobs.token_logprobs, abs=1e-6)
        assert chunks[-1].finish_reason == whole.finish_reason


def wait_until_freed(attention: AttentionClient, timeout_s: float = 20.0):
    """The instance's load once nothing runs and every KV block is free (or at the deadline)."""
    deadline = time.monotonic() + timeout_s
    load = attention.load()
    while time.monotonic() < deadline:
        if load.num_running == 0 and load.num_free_blocks == load.num_total_blocks:
            break
        time.sleep(0.1)
        load = attention.load()
    return load
