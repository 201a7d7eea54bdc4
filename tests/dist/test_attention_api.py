"""The attention instance's gRPC API end to end, in one process: a real server over a real
driver and engine, a real client over a real channel. The oracle is the engine's own
`generate`, run on a second engine."""

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.sampling_params import SamplingParams
from services.common.wire import attention as wire
from tests.support.attention_api import NUM_BLOCKS, make_engine, serve, wait_until_idle

pytestmark = pytest.mark.timeout(60)

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
LONG = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)


def tokens(outputs):
    return [t for o in outputs for t in o.new_token_ids]


def test_concurrent_streams_give_the_engines_tokens(tiny_model_f64, api):
    prompts = [[(7 * i + j) % 500 for j in range(3 + 5 * i)] for i in range(8)]
    expected = make_engine(tiny_model_f64).generate(prompts, GREEDY)
    results = {}

    def client(indices):
        for i in indices:
            results[i] = list(api.client.generate(f"c{i}", prompts[i], GREEDY))

    threads = [threading.Thread(target=client, args=(range(k, 8, 4),)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for i, want in enumerate(expected):
        outputs = results[i]
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        assert tokens(outputs) == want.token_ids
        assert all(o.request_id == f"c{i}" for o in outputs)
        assert outputs[-1].finish_reason == want.finish_reason
        assert outputs[-1].num_prompt_tokens == len(prompts[i])


def test_a_stop_token_comes_back_as_the_stop_reason(tiny_model_f64, api):
    prompt = [11, 12, 13, 14, 15]
    six = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    generated = make_engine(tiny_model_f64).generate([prompt], six)[0].token_ids

    params = SamplingParams(
        max_tokens=50, temperature=0.0, ignore_eos=True, stop_token_ids=(generated[3],)
    )
    by_token = list(api.client.generate("st", prompt, params))
    assert tokens(by_token) == generated[: generated.index(generated[3]) + 1]
    assert (by_token[-1].finish_reason, by_token[-1].stop_reason) == ("stop", generated[3])
    # Stop strings are the client's (it has the text): the instance generates on.
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, stop=(" w",))
    by_string = list(api.client.generate("ss", prompt, params))
    assert tokens(by_string) == generated and by_string[-1].finish_reason == "length"


def test_logprobs_arrive_one_per_new_token(tiny_model_f64, api):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    want = make_engine(tiny_model_f64).generate([prompt], params)[0]
    deltas = list(api.client.generate("lp", prompt, params))
    got = [lp for d in deltas for lp in d.new_logprobs]
    assert all(len(d.new_logprobs) == len(d.new_token_ids) for d in deltas)
    assert [lp.token_id for lp in got] == want.token_ids
    for mine, theirs in zip(got, want.logprobs, strict=True):
        assert mine.logprob == pytest.approx(theirs.logprob)
        assert [t for t, _ in mine.top] == [t for t, _ in theirs.top] and len(mine.top) == 3
    assert all(not d.new_logprobs for d in api.client.generate("nolp", prompt, GREEDY))


def test_cancel_rpc_ends_the_stream_and_frees_every_block(api):
    stream = api.client.generate("cancel-me", list(range(1, 40)), LONG)
    assert next(stream).new_token_ids
    api.client.cancel("cancel-me")
    rest = list(stream)
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    api.client.cancel("no-such-request")  # harmless
    load = wait_until_idle(api.client)
    assert load.num_free_blocks == load.num_total_blocks == NUM_BLOCKS


def test_a_client_that_goes_away_frees_every_block(api):
    generated_before = api.engine.stats.num_generated_tokens
    stream = api.client.generate("walk-away", list(range(50, 90)), LONG)
    assert next(stream).new_token_ids
    assert api.client.load().num_free_blocks < NUM_BLOCKS
    stream.close()  # cancels the call mid-stream
    load = wait_until_idle(api.client)
    assert load.num_free_blocks == load.num_total_blocks
    # Aborted, not run to its end (the stats are ints, safe to read from here).
    assert api.engine.stats.num_generated_tokens - generated_before < LONG.max_tokens


@pytest.mark.parametrize(
    ("prompt", "change", "message"),
    [
        ([1, 2], lambda p: setattr(p, "temperature", -1.0), "temperature"),
        ([1, 2], lambda p: setattr(p, "top_p", 0.0), "top_p"),
        ([], None, "empty"),
        ([1, 512], None, "512 is outside the vocabulary"),
    ],
)
def test_invalid_requests_are_invalid_argument(api, prompt, change, message):
    request = wire.generate_request("bad", prompt, GREEDY)
    if change:
        change(request.params)
    with pytest.raises(grpc.RpcError) as info:
        list(wire.attention_stub(api.channel).Generate(request))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_a_running_request_id_is_already_exists(api):
    stream = api.client.generate("twice", [1, 2, 3], LONG)
    next(stream)
    with pytest.raises(grpc.RpcError) as info:
        list(api.client.generate("twice", [4, 5], GREEDY))
    assert info.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert "twice" in info.value.details()
    stream.close()
    wait_until_idle(api.client)


def test_health_answers_serving(api):
    health = health_pb2_grpc.HealthStub(api.channel)
    for service in ("", wire.SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_shutdown_ends_open_streams_with_unavailable(tiny_model_f64):
    served = serve(tiny_model_f64)
    try:
        stream = served.client.generate("open", [1, 2, 3], LONG)
        next(stream)
        served.driver.stop()
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in info.value.details()
    finally:
        served.channel.close()
        served.server.stop(0)


def test_sampling_params_cross_the_wire_whole():
    message_fields = {f.name for f in wire.params_to_proto(SamplingParams()).DESCRIPTOR.fields}
    assert message_fields == set(SamplingParams.__dataclass_fields__)
    params = SamplingParams(
        max_tokens=5, temperature=0.5, top_p=0.9, top_k=7, seed=-3, stop=("a", "bc"),
        stop_token_ids=(4, 0), ignore_eos=True, skip_special_tokens=False, logprobs=0,
        presence_penalty=0.5, frequency_penalty=-1.25,
    )  # fmt: skip
    assert wire.params_from_proto(wire.params_to_proto(params)) == params
    assert wire.params_from_proto(wire.params_to_proto(SamplingParams())) == SamplingParams()
    empty = wire.generate_request("x", [1], SamplingParams()).params
    empty.Clear()  # a client that sets nothing gets the defaults, not zeros
    assert wire.params_from_proto(empty) == SamplingParams()
