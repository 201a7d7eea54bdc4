"""The gateway's choices (services/gateway/generation.py) against a real attention instance in
this process: the gateway reads the text of the instance's tokens, and a stop string it finds
ends the choice and cancels the request on the instance, whose KV blocks come back. The
oracles: the engine's own `generate` on a second engine, and the instance's accounting of
generated tokens and free blocks."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from services.common.sampling_params import SamplingParams
from services.gateway.admission import LimitConfig
from services.gateway.generation import Choices, Job
from services.gateway.router import Router
from tests.support.attention_api import NUM_BLOCKS, WordDecoder, make_engine, wait_until_idle

pytestmark = pytest.mark.timeout(60)

LONG = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
PROMPT = [11, 12, 13, 14, 15]


def run_choices(address: str, jobs: list[Job]) -> list[list]:
    """Every choice's text deltas, as the HTTP handlers read them."""

    async def main() -> list[list]:
        router = Router([address], LimitConfig(), max_queue=8)
        await router.start()
        choices = Choices(router, "cmpl-test", jobs, WordDecoder())
        deltas: list[list] = [[] for _ in jobs]
        try:
            while (item := await choices.next()) is not None:
                deltas[item.index].append(item.delta)
        finally:
            await choices.close()
            await router.close()
        return deltas

    return asyncio.run(main())


def test_choices_text_is_the_text_of_the_engines_tokens(tiny_model_f64, api):
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    (expected,) = make_engine(tiny_model_f64).generate([PROMPT], params)
    (deltas,) = run_choices(api.address, [Job(PROMPT, params)])
    assert "".join(d.text for d in deltas) == expected.text == WordDecoder().decode(
        expected.token_ids
    )
    assert [t for d in deltas for t in d.output.new_token_ids] == expected.token_ids
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"


def test_a_stop_string_ends_the_choice_and_frees_the_request_on_the_instance(
    tiny_model_f64, api
):
    generated = make_engine(tiny_model_f64).generate([PROMPT], LONG)[0].token_ids
    stop = f" w{generated[4]} w{generated[5]}"  # across two tokens
    other = f"w{generated[7]} "  # later in the text: the earliest match wins
    before = api.engine.stats.num_generated_tokens
    params = dataclasses.replace(LONG, stop=(other, stop))
    (deltas,) = run_choices(api.address, [Job(PROMPT, params)])
    text = "".join(d.text for d in deltas)
    assert text == "".join(f" w{t}" for t in generated[:4])
    last = deltas[-1]
    assert (last.finished, last.finish_reason, last.stop_reason) == (True, "stop", stop)
    assert not any(d.finished for d in deltas[:-1])
    # The instance aborted the request when the gateway cancelled it, long before max_tokens.
    load = wait_until_idle(api.client)
    assert load.num_running == 0 and load.num_free_blocks == NUM_BLOCKS
    assert api.engine.stats.num_generated_tokens - before < LONG.max_tokens // 2
