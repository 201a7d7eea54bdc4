"""The engine driver: a real engine on its own thread, fed from many threads. The oracle is
the same engine's `generate`, run single-threaded."""

import random
import threading
import time

import pytest

from services.attention.builder import local_engine
from services.attention.driver import (
    DriverStopped,
    DuplicateRequestError,
    EngineDriver,
    EngineFailed,
)
from services.attention.engine import EngineConfig, RequestError
from services.attention.scheduler import SchedulerConfig
from services.common.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(60)

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
LONG = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)


def make_engine(model, blocks=64):
    config = EngineConfig(
        block_size=4,
        num_kv_blocks=blocks,
        max_model_len=256,
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32),
    )
    return local_engine(model, config)


def random_prompts(count, seed):
    rng = random.Random(seed)
    return [[rng.randrange(500) for _ in range(rng.randint(1, 40))] for _ in range(count)]


@pytest.fixture
def driver(tiny_model_f64):
    driver = EngineDriver(make_engine(tiny_model_f64), idle_wait_s=0.001)
    driver.start()
    yield driver
    driver.stop(timeout_s=10)


def tokens(outputs):
    return [t for o in outputs for t in o.new_token_ids]


def wait_until_idle(driver, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        load = driver.load()
        if load.num_running == load.num_waiting == 0:
            return load
        time.sleep(0.005)
    raise AssertionError(f"still busy after {timeout_s} s: {driver.load()}")


def test_concurrent_submissions_give_the_engines_tokens(tiny_model_f64, driver):
    prompts = random_prompts(12, seed=1)
    expected = make_engine(tiny_model_f64).generate(prompts, GREEDY)
    results: dict[int, list] = {}

    def client(indices):
        for i in indices:
            results[i] = list(driver.submit(f"req-{i}", prompts[i], GREEDY))

    # Each thread submits its next request only when the previous one ends, so requests
    # join a batch that is already running.
    threads = [threading.Thread(target=client, args=(range(k, 12, 4),)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for i, want in enumerate(expected):
        outputs = results[i]
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        assert tokens(outputs) == want.token_ids
        assert outputs[-1].finish_reason == want.finish_reason
    load = wait_until_idle(driver)
    assert load.num_free_blocks == load.num_total_blocks == 64


def test_cancel_mid_stream_frees_every_block(driver):
    streams = [driver.submit(f"long-{i}", list(range(1 + i, 30 + i)), LONG) for i in range(3)]
    first = next(streams[0])
    assert first.new_token_ids and not first.finished
    streams[0].cancel()
    driver.cancel("long-1")  # by id, before its stream was ever read
    rest = list(streams[0])
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert rest[-1].new_token_ids == () and rest[-1].num_prompt_tokens == 29
    assert len(tokens([first, *rest])) < LONG.max_tokens
    outputs = list(streams[1])
    assert outputs[-1].finish_reason == "abort"
    assert next(streams[2]).new_token_ids  # the third one still runs

    assert driver.load().num_free_blocks < 64
    streams[2].cancel()
    assert list(streams[2])[-1].finish_reason == "abort"
    load = wait_until_idle(driver)
    assert load.num_free_blocks == load.num_total_blocks


def test_bad_requests_raise_in_submit_and_nothing_is_queued(driver):
    with pytest.raises(RequestError, match="empty"):
        driver.submit("a", [], GREEDY)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        driver.submit("b", [1, 512], GREEDY)
    with pytest.raises(RequestError, match="at most"):
        driver.submit("c", [1] * 300, GREEDY)
    running = driver.submit("d", [1, 2, 3], LONG)
    with pytest.raises(DuplicateRequestError, match="already running"):
        driver.submit("d", [4, 5], GREEDY)
    running.cancel()
    list(running)
    load = wait_until_idle(driver)
    assert load.num_free_blocks == load.num_total_blocks
    assert list(driver.submit("d", [4, 5], GREEDY))[-1].finish_reason is not None  # id reusable


def test_stop_ends_open_streams_with_an_error(tiny_model_f64):
    driver = EngineDriver(make_engine(tiny_model_f64))
    with pytest.raises(RuntimeError, match="start"):
        driver.submit("early", [1, 2], GREEDY)
    driver.start()
    stream = driver.submit("open", [1, 2, 3], LONG)
    next(stream)
    driver.stop(timeout_s=10)
    with pytest.raises(DriverStopped, match="shutting down"):
        list(stream)
    with pytest.raises(DriverStopped, match="shutting down"):
        driver.submit("late", [1, 2], GREEDY)
    assert driver.load().num_free_blocks == driver.load().num_total_blocks


def test_a_failing_step_fails_every_stream_and_later_submissions(tiny_model_f64):
    engine = make_engine(tiny_model_f64)
    step = engine.step
    calls = 0

    def failing_step():
        nonlocal calls
        calls += 1
        if calls > 3:
            raise RuntimeError("device lost")
        return step()

    engine.step = failing_step
    driver = EngineDriver(engine)
    driver.start()
    streams = [driver.submit(f"r{i}", [1, 2, 3 + i], LONG) for i in range(2)]
    for stream in streams:
        with pytest.raises(EngineFailed, match="device lost"):
            list(stream)
    with pytest.raises(RuntimeError, match="engine failed.*device lost"):
        driver.submit("after", [1, 2], GREEDY)
    assert isinstance(driver.failure, RuntimeError)
    driver.stop(timeout_s=10)


def test_a_driver_steps_while_idle_when_peers_need_it_and_still_serves(tiny_model_f64):
    engine = make_engine(tiny_model_f64)
    driver = EngineDriver(engine, must_step=lambda: True)
    driver.start()
    try:
        deadline = time.monotonic() + 5
        while engine.stats.num_steps < 10 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.stats.num_steps >= 10  # empty steps, no request in sight
        prompt = [7, 8, 9, 10]
        want = make_engine(tiny_model_f64).generate([prompt], GREEDY)[0].token_ids
        assert tokens(driver.submit("x", prompt, GREEDY)) == want
    finally:
        driver.stop(timeout_s=10)


def test_an_idle_driver_does_not_step_until_woken_to_join_its_peers(tiny_model_f64):
    engine = make_engine(tiny_model_f64)
    peers_busy = threading.Event()
    driver = EngineDriver(engine, must_step=peers_busy.is_set, idle_wait_s=30)
    driver.start()
    try:
        time.sleep(0.3)
        assert engine.stats.num_steps == 0  # an idle cluster does not spin
        peers_busy.set()
        driver.wake()  # what the step bell does when a peer opened a step
        deadline = time.monotonic() + 5
        while engine.stats.num_steps < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.stats.num_steps >= 3  # long before the 30 s idle wait ran out
    finally:
        driver.stop(timeout_s=10)


class BrokenEpoch(RuntimeError):
    """Stands for a peer failure: what `Recovery.recoverable` accepts."""


class FakeRecovery:
    """Records rejoins; `fail_with` makes them fail; `gate` holds one until set."""

    def __init__(self, fail_with=None):
        self.calls: list[str] = []
        self.fail_with = fail_with
        self.gate = threading.Event()
        self.gate.set()
        self.inside = threading.Event()

    def needed(self):
        return False

    def recoverable(self, error):
        return isinstance(error, BrokenEpoch)

    def recover(self, why):
        self.calls.append(why)
        self.inside.set()
        self.gate.wait(10)
        if self.fail_with is not None:
            raise self.fail_with


def failing_once_at(engine, step_number, error):
    step, calls = engine.step, [0]

    def flaky():
        calls[0] += 1
        if calls[0] == step_number:
            raise error
        return step()

    engine.step = flaky


def test_a_broken_epoch_is_rejoined_and_every_request_ends_with_the_tokens_it_would_have(
    tiny_model_f64,
):
    prompts = random_prompts(4, seed=5)
    expected = make_engine(tiny_model_f64).generate(prompts, LONG)
    engine = make_engine(tiny_model_f64)
    failing_once_at(engine, 6, BrokenEpoch("ffn instance 1 failed layer 3"))
    recovery = FakeRecovery()
    recovery.gate.clear()
    driver = EngineDriver(engine, recovery=recovery)
    driver.start()
    try:
        streams = [driver.submit(f"r{i}", p, LONG) for i, p in enumerate(prompts)]
        assert recovery.inside.wait(10)
        # While the cluster re-forms: not admitting, and new requests are told to retry.
        assert driver.load().admitting is False
        with pytest.raises(DriverStopped, match="re-forming.*ffn instance 1.*retry"):
            driver.submit("during", [1, 2], GREEDY)
        recovery.gate.set()
        assert [tokens(stream) for stream in streams] == [e.token_ids for e in expected]
        assert recovery.calls == ["ffn instance 1 failed layer 3"]
        assert driver.load().admitting is True
    finally:
        driver.stop(timeout_s=10)


def test_when_the_cluster_cannot_re_form_requests_end_clearly_and_the_engine_is_clean(
    tiny_model_f64,
):
    engine = make_engine(tiny_model_f64)
    failing_once_at(engine, 3, BrokenEpoch("attention instance 0 failed layer 0"))
    driver = EngineDriver(engine, recovery=FakeRecovery(TimeoutError("ffn instance 1 missing")))
    driver.start()
    try:
        streams = [driver.submit(f"r{i}", [1, 2, 3 + i], LONG) for i in range(2)]
        for stream in streams:
            with pytest.raises(DriverStopped, match="could not re-form.*ffn instance 1 missing"):
                list(stream)
        assert wait_until_idle(driver).num_free_blocks == 64
        want = make_engine(tiny_model_f64).generate([[4, 5]], GREEDY)[0].token_ids
        assert tokens(driver.submit("after", [4, 5], GREEDY)) == want
    finally:
        driver.stop(timeout_s=10)


def test_drain_refuses_new_requests_and_waits_for_those_in_flight(tiny_model_f64, driver):
    stream = driver.submit("long", [1, 2, 3], LONG)
    done: list[bool] = []
    drainer = threading.Thread(target=lambda: done.append(driver.drain(30)))
    drainer.start()
    deadline = time.monotonic() + 5
    while driver.load().admitting and time.monotonic() < deadline:
        time.sleep(0.005)
    with pytest.raises(DriverStopped, match="draining.*another instance"):
        driver.submit("late", [1, 2], GREEDY)
    assert len(tokens(stream)) == LONG.max_tokens
    drainer.join(10)
    assert done == [True]
    assert driver.drain(0.5) is True  # nothing left
