"""OpenAI's logit_bias: each biased token's logit moves by its bias before sampling, for the
rows that ask and no other; the logprobs stay the raw model's."""

import pytest
import torch

from services.attention.builder import local_engine
from services.attention.engine import EngineConfig
from services.attention.sampler import sample
from services.common.model.reference import reference_logits
from services.common.sampling_params import SamplingParams

PROMPTS = [[1, 2, 3], [7, 7, 7, 7, 7]]


def greedy(max_tokens=6, **kwargs):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


def test_a_bias_of_100_forces_a_token_and_minus_100_bans_one(tiny_model_f64):
    engine = local_engine(tiny_model_f64, EngineConfig(block_size=4, max_model_len=64))
    plain, forced, banned = engine.generate(
        [PROMPTS[0]] * 3,
        [
            greedy(),
            greedy(logit_bias=((321, 100.0),), logprobs=0),
            greedy(logit_bias=tuple((t, -100.0) for t in range(0, 256))),
        ],
    )
    assert forced.token_ids == [321] * 6 != plain.token_ids
    assert all(t >= 256 for t in banned.token_ids) and plain.token_ids[0] < 256
    # The logprobs are the raw model's, not the biased distribution's.
    raw = reference_logits(tiny_model_f64, PROMPTS[0], last_only=True)[-1]
    assert forced.logprobs[0].logprob == pytest.approx(float(torch.log_softmax(raw, -1)[321]))
    assert forced.logprobs[0].logprob < -1.0


def test_a_bias_moves_the_logit_by_its_value_for_its_row_only():
    logits = torch.zeros(2, 10)
    logits[:, 4] = 1.0
    generators = [torch.Generator(), torch.Generator()]
    biased = [greedy(logit_bias=((2, 0.5),)), greedy()]
    assert sample(logits, biased, generators) == [4, 4]  # 0.5 is not enough to pass 1.0
    biased = [greedy(logit_bias=((2, 1.5),)), greedy()]
    assert sample(logits, biased, generators) == [2, 4]
    assert logits[0, 2] == 0.0  # the raw logits stay raw


@pytest.mark.parametrize(
    ("bias", "message"),
    [
        (((1, 101.0),), r"logit_bias of token 1 must be a number in \[-100, 100\], got 101.0"),
        (((-1, 1.0),), "logit_bias must map token ids to biases"),
        (((1, True),), "logit_bias of token 1 must be a number"),
    ],
)
def test_bad_biases_are_refused_naming_the_token(bias, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(logit_bias=bias)
