"""The engine against the oracle: paged, batched, chunked, preempted and prefix-cached
generation must give exactly the reference model's tokens."""

import random

import pytest
import torch

from services.attention.builder import local_engine
from services.attention.engine import EngineConfig, RequestError
from services.attention.scheduler import SchedulerConfig
from services.common.completion import Completions
from services.common.model.reference import reference_greedy, reference_logits
from services.common.sampling_params import SamplingParams
from tests.support.models import random_model, small_config

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


def make_engine(model, blocks=None, block_size=4, seqs=8, budget=24, caching=True, tokenizer=None):
    config = EngineConfig(
        block_size=block_size,
        num_kv_blocks=blocks,
        max_model_len=256,
        scheduler=SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=budget),
        enable_prefix_caching=caching,
    )
    return local_engine(model, config, tokenizer)


def random_prompts(count, seed, vocab=500):
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(13)]
    prompts = []
    for i in range(count):
        own = [rng.randrange(vocab) for _ in range(rng.randint(1, 60))]
        prompts.append(shared + own if i % 3 == 0 else own)  # a third share a prefix
    return prompts


def run_all(engine, prompts, params, late_start=None):
    """Add prompts (the second half only after a few steps, if late_start), run to the end."""
    late_start = len(prompts) if late_start is None else late_start
    results = Completions()
    for i, prompt in enumerate(prompts):
        results.add_request(str(i), prompt, params)
    for i, prompt in enumerate(prompts[:late_start]):
        engine.add_request(str(i), prompt, params)
    steps = 0
    while engine.has_unfinished_requests() or late_start < len(prompts):
        if steps == 3:
            for i in range(late_start, len(prompts)):
                engine.add_request(str(i), prompts[i], params)
            late_start = len(prompts)
        for output in engine.step():
            results.add(output)
        steps += 1
    return [results[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("caching", [True, False])
def test_engine_greedy_equals_reference_under_pressure(tiny_model_f64, caching):
    prompts = random_prompts(18, seed=1)
    # 40 blocks x 4 slots cannot hold 8 sequences of up to 83 tokens: preemption must happen.
    engine = make_engine(tiny_model_f64, blocks=40, caching=caching)
    outputs = run_all(engine, prompts, GREEDY, late_start=9)

    eos = tiny_model_f64.cfg.eos_token_ids
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.token_ids == reference_greedy(tiny_model_f64, prompt, 10, eos), out.request_id
    assert engine.stats.num_preemptions > 0
    assert max(map(len, prompts)) > 24  # some prompts were prefilled in several chunks
    assert (engine.stats.num_prefix_hit_tokens > 0) == caching
    assert engine.num_free_blocks == 40  # every block came back


def test_engine_with_roomy_cache_and_big_budget_also_matches(tiny_model_f64):
    prompts = random_prompts(8, seed=2)
    engine = make_engine(tiny_model_f64, blocks=None, block_size=16, budget=4096)
    outputs = run_all(engine, prompts, GREEDY)
    eos = tiny_model_f64.cfg.eos_token_ids
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.token_ids == reference_greedy(tiny_model_f64, prompt, 10, eos)
    assert engine.stats.num_preemptions == 0


def test_prefix_cache_hit_gives_the_same_tokens(tiny_model_f64):
    engine = make_engine(tiny_model_f64)
    prompt = list(range(1, 30))
    first = engine.generate([prompt], GREEDY)[0]
    second = engine.generate([prompt], GREEDY)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 28
    assert second.token_ids == first.token_ids


def test_float32_engine_agrees_with_float32_reference():
    model = random_model(small_config(), torch.float32)
    prompts = random_prompts(6, seed=3)
    outputs = make_engine(model).generate(prompts, GREEDY)
    agree = sum(
        out.token_ids == reference_greedy(model, p, 10, model.cfg.eos_token_ids)
        for p, out in zip(prompts, outputs, strict=True)
    )
    assert agree >= 5  # float32 summation order may flip a rare near-tie, no more


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_model_f64):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=42)
    prompt = [5, 6, 7, 8]
    alone = make_engine(tiny_model_f64).generate([prompt], params)[0].token_ids
    others = random_prompts(5, seed=4)
    mixed = (
        make_engine(tiny_model_f64)
        .generate([*others, prompt], [GREEDY] * 5 + [params])[-1]
        .token_ids
    )
    assert alone == mixed
    other_seed = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=43)
    assert make_engine(tiny_model_f64).generate([prompt], other_seed)[0].token_ids != alone


def test_stop_token_ends_generation_on_it(tiny_model_f64):
    prompt = [9, 8, 7]
    expected = reference_greedy(tiny_model_f64, prompt, 10)
    stop_id = expected[3]
    first = expected.index(stop_id)
    params = SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(stop_id,))
    out = make_engine(tiny_model_f64).generate([prompt], params)[0]
    assert out.token_ids == expected[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)


def test_eos_stops_unless_ignored():
    prompt = [9, 8, 7]
    model = random_model(small_config(), torch.float64)
    eos = reference_greedy(model, prompt, 10)[2]
    model = random_model(small_config(eos_token_ids=(eos,)), torch.float64)
    expected = reference_greedy(model, prompt, 10, (eos,))
    out = make_engine(model).generate([prompt], GREEDY)[0]
    assert out.token_ids == expected and out.token_ids[-1] == eos
    assert (out.finish_reason, out.stop_reason) == ("stop", None)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    out = make_engine(model).generate([prompt], params)[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_max_tokens_and_context_length_end_with_length(tiny_model_f64):
    out = make_engine(tiny_model_f64).generate(
        [[1, 2]], SamplingParams(max_tokens=3, temperature=0)
    )[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    engine = make_engine(tiny_model_f64)
    prompt = list(range(250))  # max_model_len is 256
    out = engine.generate([prompt], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[
        0
    ]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_each_output_carries_only_its_new_token_and_logprob(tiny_model_f64):
    # A delta: the 200th output is as small as the first (no list that grows with the output).
    engine = make_engine(tiny_model_f64)
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True, logprobs=2)
    engine.add_request("r", [4, 5, 6], params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert len(outputs) == 200 and outputs[-1].finished
    assert not any(o.finished for o in outputs[:-1])
    assert all(len(o.new_token_ids) == len(o.new_logprobs) == 1 for o in outputs)
    assert all(o.new_logprobs[0].token_id == o.new_token_ids[0] for o in outputs)
    assert all(o.num_prompt_tokens == 3 and o.prompt_logprobs == () for o in outputs)
    expected = make_engine(tiny_model_f64).generate([[4, 5, 6]], params)[0]
    assert [t for o in outputs for t in o.new_token_ids] == expected.token_ids


def test_stop_strings_are_not_the_engine_s(tiny_model_f64):
    # The engine has no text: a stop string does not end a request there (clients do it).
    engine = make_engine(tiny_model_f64)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, stop=(" ",))
    engine.add_request("r", [1, 2, 3], params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert len(outputs) == 6 and outputs[-1].finish_reason == "length"


def test_abort_frees_blocks_and_stops_outputs(tiny_model_f64):
    engine = make_engine(tiny_model_f64, blocks=64)
    engine.add_request("a", list(range(40)), GREEDY)
    engine.add_request("b", list(range(5)), GREEDY)
    engine.step()
    engine.abort_request("a")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert {o.request_id for o in outputs} == {"b"}
    engine.abort_request("b")  # finished already: a no-op
    assert engine.num_free_blocks == 64


def test_bad_requests_are_refused_with_a_reason_and_leave_no_trace(tiny_model_f64):
    engine = make_engine(tiny_model_f64)
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("x", [], GREEDY)
    with pytest.raises(RequestError, match="token id 512 is outside the vocabulary"):
        engine.add_request("x", [1, 512], GREEDY)
    with pytest.raises(RequestError, match="300 tokens.*at most 256"):
        engine.add_request("x", [1] * 300, GREEDY)
    engine.add_request("x", [1], GREEDY)
    with pytest.raises(RequestError, match="already running"):
        engine.add_request("x", [2], GREEDY)
    assert engine.scheduler.num_unfinished == 1


def test_cache_smaller_than_the_context_caps_the_model_length(tiny_model_f64):
    engine = make_engine(tiny_model_f64, blocks=10, block_size=4)
    assert engine.max_model_len == 40
    with pytest.raises(RequestError, match="at most 40"):
        engine.add_request("x", [1] * 40, GREEDY)


def test_logprobs_are_the_reference_distribution(tiny_model_f64):
    prompt = [4, 5, 6]
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=3)
    out = make_engine(tiny_model_f64).generate([prompt], params)[0]
    assert len(out.logprobs) == 4
    tokens = list(prompt)
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        expected = torch.log_softmax(reference_logits(tiny_model_f64, tokens)[-1].float(), -1)
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(expected[token].item(), abs=1e-5)
        top = torch.topk(expected, 3)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert entry.top[0][0] == token  # greedy picks the most likely
        tokens.append(token)
    assert make_engine(tiny_model_f64).generate([prompt], GREEDY)[0].logprobs is None
