"""Presence and frequency penalties against a hand-written oracle: greedy generation with the
reference model, each step's logits penalised by OpenAI's formula over the generated tokens."""

from collections import Counter

import pytest
import torch

from services.attention.builder import local_engine
from services.attention.engine import EngineConfig
from services.attention.sampler import sample
from services.attention.scheduler import SchedulerConfig
from services.common.model.reference import reference_logits
from services.common.sampling_params import SamplingParams

PROMPTS = [[1, 2, 3], [7, 7, 7, 7, 7], [100, 200, 300, 400, 5, 6, 7, 8, 9, 10, 11], [42]]
MAX_TOKENS = 12


def make_engine(model):
    config = EngineConfig(
        block_size=4,
        max_model_len=128,
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16),
    )
    return local_engine(model, config)


def oracle_greedy(model, prompt, max_tokens, presence, frequency):
    """Greedy continuation, penalising each token j by presence*(c_j>0) + frequency*c_j."""
    tokens = list(prompt)
    generated: list[int] = []
    for _ in range(max_tokens):
        logits = reference_logits(model, tokens, last_only=True)[-1].clone()  # [V]
        for token, count in Counter(generated).items():
            logits[token] -= presence * (count > 0) + frequency * count
        next_id = int(logits.argmax())
        tokens.append(next_id)
        generated.append(next_id)
    return generated


def penalised(presence, frequency):
    return SamplingParams(
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        ignore_eos=True,
        presence_penalty=presence,
        frequency_penalty=frequency,
    )


def num_repeats(tokens):
    return len(tokens) - len(set(tokens))


@pytest.mark.parametrize(
    ("presence", "frequency"),
    [(1.5, 0.0), (0.0, 0.7), (0.9, 0.4), (-1.0, 0.0), (0.0, -0.5), (-2.0, 2.0)],
)
def test_penalised_greedy_equals_oracle(tiny_model_f64, presence, frequency):
    engine = make_engine(tiny_model_f64)
    outputs = engine.generate(PROMPTS, penalised(presence, frequency))
    plain = engine.generate(PROMPTS, penalised(0.0, 0.0))
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        want = oracle_greedy(tiny_model_f64, prompt, MAX_TOKENS, presence, frequency)
        assert out.token_ids == want
    # The penalty must bite somewhere, or the oracle would prove nothing.
    assert any(o.token_ids != p.token_ids for o, p in zip(outputs, plain, strict=True))


def test_penalised_and_plain_requests_share_a_batch(tiny_model_f64):
    engine = make_engine(tiny_model_f64)
    params = [penalised(0.0, 2.0), penalised(0.0, 0.0), penalised(1.0, 0.0), penalised(0.0, 0.0)]
    outputs = engine.generate(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, outputs, strict=True):
        want = oracle_greedy(
            tiny_model_f64, prompt, MAX_TOKENS, p.presence_penalty, p.frequency_penalty
        )
        assert out.token_ids == want


def test_frequency_penalty_reduces_repeats(tiny_model_f64):
    engine = make_engine(tiny_model_f64)
    plain = engine.generate(PROMPTS, penalised(0.0, 0.0))
    strong = engine.generate(PROMPTS, penalised(0.0, 2.0))
    plain_repeats = sum(num_repeats(o.token_ids) for o in plain)
    strong_repeats = sum(num_repeats(o.token_ids) for o in strong)
    assert plain_repeats > 0  # the random model repeats itself, so the penalty has work to do
    assert strong_repeats < plain_repeats
    assert any(p.token_ids != s.token_ids for p, s in zip(plain, strong, strict=True))


def test_penalties_leave_logprobs_raw(tiny_model_f64):
    engine = make_engine(tiny_model_f64)
    params = SamplingParams(
        max_tokens=6, temperature=0.0, ignore_eos=True, frequency_penalty=2.0, logprobs=0
    )
    out = engine.generate([PROMPTS[0]], params)[0]
    for i, (token, logprob) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        raw = reference_logits(tiny_model_f64, PROMPTS[0] + out.token_ids[:i], last_only=True)
        assert logprob.logprob == pytest.approx(float(torch.log_softmax(raw[-1], -1)[token]))


def test_no_penalties_leave_logits_and_tokens_alone():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    params = [SamplingParams(temperature=0.0)] * 3
    generators = [torch.Generator() for _ in range(3)]
    history = [[int(logits[0].argmax())] * 3, [], [1]]
    assert sample(logits, params, generators, history) == logits.argmax(-1).tolist()
    heavy = [SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)] * 3
    assert sample(logits, heavy, generators, history)[0] != int(logits[0].argmax())
    assert torch.equal(logits, before)  # the raw logits stay raw for logprobs


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [2.5, -2.01, float("nan"), "1", True, None])
def test_penalty_validation_names_parameter_and_value(name, value):
    with pytest.raises(ValueError, match=name) as info:
        SamplingParams(**{name: value})
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", [-2.0, -2, 0, 1.25, 2.0])
def test_penalty_accepts_range(value):
    assert SamplingParams(presence_penalty=value, frequency_penalty=value).presence_penalty == value
