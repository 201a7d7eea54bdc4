"""Prompt logprobs (what evaluation harnesses ask for with `echo`): each prompt token after
the first scored by the model's distribution at the position before it, equal to the
reference model's log-softmax, across chunked prefill, micro-batches and a cached prefix."""

import pytest
import torch

from services.attention.builder import local_engine
from services.attention.engine import EngineConfig
from services.attention.scheduler import SchedulerConfig
from services.common.model.reference import reference_logits
from services.common.sampling_params import SamplingParams

PROMPTS = [[5, 9, 17, 3, 3, 40, 2, 8, 11, 60, 7], [1, 2], [42]]


@pytest.mark.parametrize("budget", [64, 4])  # whole prompts, and chunked prefill
def test_prompt_logprobs_equal_the_reference_log_softmax(tiny_model_f64, budget):
    config = EngineConfig(
        block_size=4, max_model_len=64,
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget),
    )  # fmt: skip
    engine = local_engine(tiny_model_f64, config)
    engine.generate([PROMPTS[0]], SamplingParams(max_tokens=1))  # its prefix is cached now
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3)
    outputs = engine.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        expected = torch.log_softmax(reference_logits(tiny_model_f64, prompt), dim=-1)
        assert [lp.token_id for lp in out.prompt_logprobs] == prompt[1:]
        for position, lp in enumerate(out.prompt_logprobs):
            assert lp.logprob == pytest.approx(float(expected[position, prompt[position + 1]]))
            top = torch.topk(expected[position], 3)
            assert [t for t, _ in lp.top] == top.indices.tolist()
        assert out.num_cached_tokens == 0  # scored prompts skip the prefix cache


def test_prompt_logprobs_reach_the_wire_once_with_the_first_token(tiny_model_f64):
    from services.common.wire.attention import output_from_proto, output_to_proto

    engine = local_engine(tiny_model_f64, EngineConfig(block_size=4, max_model_len=64))
    engine.add_request("r", PROMPTS[0], SamplingParams(max_tokens=3, prompt_logprobs=0))
    outputs, received = [], []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    received = [output_from_proto("r", output_to_proto(out)) for out in outputs]
    assert received == outputs  # the wire gives back the engine's own output
    sent = [out.prompt_logprobs for out in received]
    assert len(sent[0]) == len(PROMPTS[0]) - 1 and all(lp.top == () for lp in sent[0])
    assert sent[1:] == [()] * (len(sent) - 1)
    plain = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=1))[0]
    assert plain.prompt_logprobs is None
