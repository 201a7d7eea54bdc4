"""The Session RPC: many requests on one stream, one message per engine step, against a real
server, driver and engine in this process. The oracle is the per-request Generate RPC on the
same server, and the engine's own accounting of running requests and free KV blocks."""

from __future__ import annotations

import asyncio
import queue
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import cluster_secret
from services.common.sampling_params import SamplingParams
from services.common.wire import attention as wire
from services.common.wire.attention_aio import AsyncAttentionClient
from services.common.wire.attention_client import AttentionClient
from tests.support.attention_api import NUM_BLOCKS, serve, wait_until_idle

pytestmark = pytest.mark.timeout(60)

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
PROMPTS = [[5 + 7 * i + j for j in range(3 + 2 * i)] for i in range(4)]


class RawSession:
    """The Session call with the generated stub: write messages, read the responses."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self.call = wire.attention_stub(channel).Session(iter(self.outgoing.get, None))
        self.responses: list = []

    def send(self, message) -> None:
        self.outgoing.put(message)

    def until(self, done) -> dict[str, list]:
        """Read responses until done(items by request) holds; items are deltas or refusals."""
        items: dict[str, list] = {}
        for response in self.call:
            self.responses.append(response)
            for delta in response.deltas:
                items.setdefault(delta.request_id, []).append(wire.session_item(delta))
            if done(items):
                return items
        raise AssertionError("the session ended first")

    def close(self) -> None:
        self.outgoing.put(None)
        self.call.cancel()


def finished(ids):
    def check(items):
        return all(
            i in items and (isinstance(items[i][-1], grpc.RpcError) or items[i][-1].finished)
            for i in ids
        )

    return check


def test_a_session_gives_each_request_what_generate_gives_and_batches_the_steps(api):
    expected = [[t for d in api.client.generate(f"g{i}", p, GREEDY) for t in d.new_token_ids]
                for i, p in enumerate(PROMPTS)]  # fmt: skip
    session = RawSession(api.channel)
    for i, prompt in enumerate(PROMPTS):
        session.send(wire.session_generate(f"s{i}", prompt, GREEDY))
    items = session.until(finished([f"s{i}" for i in range(len(PROMPTS))]))
    session.close()
    got = [[t for d in items[f"s{i}"] for t in d.new_token_ids] for i in range(len(PROMPTS))]
    assert got == expected
    # Once all four decode together, a step's tokens share one message.
    deltas = sum(len(r.deltas) for r in session.responses)
    assert deltas == sum(len(v) for v in items.values())
    assert len(session.responses) < deltas
    assert max(len(r.deltas) for r in session.responses) == len(PROMPTS)
    assert wait_until_idle(api.client).num_free_blocks == NUM_BLOCKS


def test_a_refused_request_ends_alone_with_its_status(api):
    session = RawSession(api.channel)
    session.send(wire.session_generate("bad", [10**9], GREEDY))  # outside the vocabulary
    session.send(wire.session_generate("good", PROMPTS[0], GREEDY))
    session.send(wire.session_generate("good", PROMPTS[1], GREEDY))  # the same id again

    def good_done(items):
        return "bad" in items and any(
            not isinstance(i, grpc.RpcError) and i.finished for i in items.get("good", [])
        )

    items = session.until(good_done)
    session.close()
    refusal = items["bad"][0]
    assert isinstance(refusal, wire.SessionRefusal)
    assert refusal.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside the vocabulary" in refusal.details()
    duplicate = next(i for i in items["good"] if isinstance(i, wire.SessionRefusal))
    assert duplicate.code() == grpc.StatusCode.ALREADY_EXISTS
    tokens = [t for d in items["good"] if not isinstance(d, grpc.RpcError) for t in d.new_token_ids]
    assert len(tokens) == GREEDY.max_tokens


def test_a_cancel_message_ends_one_request_and_frees_its_blocks(api):
    session = RawSession(api.channel)
    session.send(wire.session_generate("long", PROMPTS[2], LONG))
    session.send(wire.session_generate("short", PROMPTS[0], GREEDY))
    items = session.until(lambda items: "long" in items)
    session.send(wire.session_cancel("long"))
    items = session.until(finished(["long", "short"]))
    session.close()
    assert items["long"][-1].finish_reason == "abort"
    assert len([t for d in items["long"] for t in d.new_token_ids]) < LONG.max_tokens
    assert wait_until_idle(api.client).num_free_blocks == NUM_BLOCKS


def test_a_session_that_ends_aborts_what_it_was_running(api):
    session = RawSession(api.channel)
    for i in range(3):
        session.send(wire.session_generate(f"left{i}", PROMPTS[i], LONG))
    session.until(lambda items: len(items) == 3)
    session.close()  # the gateway went away mid-generation
    load = wait_until_idle(api.client)
    assert load.num_running == 0 and load.num_free_blocks == NUM_BLOCKS


def test_many_sessions_at_once(api):
    results, errors = {}, []

    def one(k: int) -> None:
        try:
            session = RawSession(api.channel)
            session.send(wire.session_generate(f"m{k}", PROMPTS[k % 4], GREEDY))
            items = session.until(finished([f"m{k}"]))
            session.close()
            results[k] = [t for d in items[f"m{k}"] for t in d.new_token_ids]
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results) == list(range(6))
    assert results[0] == results[4] and results[1] == results[5]  # same prompt, same tokens


def test_the_gateways_session_client_shares_one_stream_and_fails_what_is_open_when_it_ends(
    tiny_model_f64,
):
    served = serve(tiny_model_f64)
    expected = [[t for d in served.client.generate(f"e{i}", p, GREEDY) for t in d.new_token_ids]
                for i, p in enumerate(PROMPTS[:2])]  # fmt: skip

    async def main() -> None:
        channel = grpc.aio.insecure_channel(served.address)
        client = AsyncAttentionClient(channel)

        async def run(i: int, params: SamplingParams) -> list[int]:
            stream = client.generate_in_session(f"a{i}", PROMPTS[i], params)
            return [t async for delta in stream for t in delta.new_token_ids]

        assert await asyncio.gather(run(0, GREEDY), run(1, GREEDY)) == expected
        long = asyncio.create_task(run(2, LONG))
        while served.engine.scheduler.num_unfinished == 0:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(served.server.stop, 0)  # the instance goes away mid-request
        with pytest.raises(grpc.RpcError):
            await asyncio.wait_for(long, 10)
        with pytest.raises(grpc.RpcError):  # a new session to a gone instance fails too
            await asyncio.wait_for(run(3, GREEDY), 10)
        await channel.close()

    try:
        asyncio.run(main())
    finally:
        served.channel.close()
        served.driver.stop()


def test_an_instance_with_a_cluster_secret_serves_only_its_holders(tiny_model_f64):
    served = serve(tiny_model_f64, secret="the-secret")
    try:
        for secret in (None, "a guess"):
            stranger = AttentionClient(served.channel, secret)
            calls = (
                lambda s=stranger: list(s.generate("x", PROMPTS[0], GREEDY)),
                lambda s=stranger: s.load(),
                lambda s=stranger: s.cancel("x"),
                lambda s=secret: list(wire.attention_stub(served.channel).Session(
                    iter([wire.session_generate("y", PROMPTS[0], GREEDY)]),
                    metadata=cluster_secret.metadata(s),
                )),
            )  # fmt: skip
            for call in calls:
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "requires its secret" in refused.value.details()
        health = health_pb2_grpc.HealthStub(served.channel)  # probes carry no secret
        reply = health.Check(health_pb2.HealthCheckRequest(service=wire.SERVICE_NAME))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        tokens = [
            t for d in served.client.generate("ok", PROMPTS[0], GREEDY) for t in d.new_token_ids
        ]
        assert len(tokens) == GREEDY.max_tokens
        assert wait_until_idle(served.client).num_running == 0
    finally:
        served.channel.close()
        served.server.stop(0)
        served.driver.stop()
