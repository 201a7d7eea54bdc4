"""`afd serve` as `make run` uses it: the whole stack, gateway included, reached with the
official `openai` client; requests spread over the attention instances."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import openai
import pytest

from services.common.wire.attention_client import AttentionClient
from tests.support.cluster import CLUSTER_SECRET, Cluster, afd, wait_until_gone


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("afd-serve") / "tiny"
    assert afd("init-checkpoint", str(path), "--preset", "tiny").wait() == 0
    return path


def test_serve_answers_the_openai_client_and_spreads_requests(checkpoint):
    cluster = Cluster(
        "--model",
        str(checkpoint),
        "--attention-instances",
        "2",
        "--ffn-instances",
        "2",
        "--dtype",
        "float32",
        gateway=True,
    )
    try:
        client = openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key="-", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        answer = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hello!"}],
            max_tokens=8,
            temperature=0,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
        assert answer.usage.completion_tokens == 8 and answer.choices[0].message.content

        started = []

        def stream(i: int) -> str:
            chunks = client.completions.create(
                model="tiny",
                prompt=f"request {i}",
                max_tokens=300,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            text = ""
            for n, chunk in enumerate(chunks):
                if n == 1:
                    started.append(i)
                text += "".join(choice.text for choice in chunk.choices)
            return text

        def running() -> list[int]:
            counts = []
            for address in cluster.addresses:
                with grpc.insecure_channel(address) as channel:
                    counts.append(AttentionClient(channel, CLUSTER_SECRET).load().num_running)
            return counts

        with ThreadPoolExecutor(8) as pool:
            results = [pool.submit(stream, i) for i in range(8)]
            while len(started) < 8 and not any(r.done() for r in results):
                time.sleep(0.05)
            per_instance = running()
            texts = [r.result(timeout=300) for r in results]
        assert all(texts)
        assert all(count > 0 for count in per_instance), per_instance
    finally:
        assert cluster.stop() == 0
    assert wait_until_gone(str(checkpoint)) == []
