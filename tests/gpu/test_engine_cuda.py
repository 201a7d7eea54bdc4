"""The model and the engine on a GPU: the same code as on CPU, checked against the oracle.

Skipped without CUDA (CI has none); run on a GPU machine with `pytest tests/gpu`.
"""

import pytest
import torch

from services.attention.builder import local_engine
from services.attention.engine import EngineConfig
from services.attention.scheduler import SchedulerConfig
from services.common.model.build import build_model, fp8_weights_on
from services.common.model.checkpoint_writer import random_tensor, write_random_weights
from services.common.model.fp8_linear import Fp8Linear
from services.common.model.reference import reference_greedy, reference_logits
from services.common.model.weights import load_weights
from services.common.sampling_params import SamplingParams
from tests.support.models import random_model, small_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [list(range(50 * i, 50 * i + n)) for i, n in enumerate((1, 9, 17, 40, 5, 33))]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def engine_for(model):
    config = EngineConfig(
        block_size=4,
        num_kv_blocks=30,  # the prompts need 48 blocks at the end: forces preemption
        scheduler=SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=16),
    )
    return local_engine(model, config)


def test_cuda_engine_equals_reference_in_float64():
    model = random_model(small_config(), torch.float64, device="cuda")
    engine = engine_for(model)
    outputs = engine.generate(PROMPTS, GREEDY)
    eos = model.cfg.eos_token_ids
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        assert out.token_ids == reference_greedy(model, prompt, 12, eos)
    assert engine.stats.num_preemptions > 0


def test_cuda_engine_in_bfloat16_tracks_the_reference():
    model = random_model(small_config(), torch.bfloat16, device="cuda")
    outputs = engine_for(model).generate(PROMPTS, GREEDY)
    eos = model.cfg.eos_token_ids
    first_tokens_agree = sum(
        out.token_ids[:1] == reference_greedy(model, p, 1, eos)
        for p, out in zip(PROMPTS, outputs, strict=True)
    )
    assert first_tokens_agree >= len(PROMPTS) - 1  # bf16 batching may flip a near-tie


def test_cuda_sampling_with_a_seed_is_reproducible():
    model = random_model(small_config(), torch.float32, device="cuda")
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.95, seed=5)
    first = engine_for(model).generate(PROMPTS[:2], params)
    again = engine_for(model).generate(PROMPTS[:2], params)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]


def test_block_fp8_checkpoint_dequantises_on_the_gpu(tmp_path):
    cfg = small_config()
    write_random_weights(tmp_path, cfg, dtype=torch.bfloat16, fp8=True, progress=False)
    name = "model.layers.1.moe.gate_proj.weight"
    loaded = load_weights(tmp_path, cfg, dtype=torch.bfloat16, device="cuda", names=[name])[name]
    assert loaded.device.type == "cuda"
    exact = random_tensor(name, tuple(loaded.shape), torch.float32, 0).cuda()
    assert (loaded.float() - exact).abs().max() <= exact.abs().max() * 2**-3


def kernel_engine(model, use_kernel: bool):
    config = EngineConfig(
        block_size=16,
        num_kv_blocks=64,
        scheduler=SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=24),
    )
    engine = local_engine(model, config)
    assert engine.runner.cache.decode_kernel  # the shape and dtype the kernel serves
    engine.runner.cache.decode_kernel = use_kernel
    return engine


def test_the_decode_kernel_path_gives_the_torch_path_tokens_and_logprobs():
    # 16 query heads of 32 sharing one K/V head: the smallest shape the MFA kernel takes.
    cfg = small_config(num_attention_heads=16, head_dim=32)
    model = random_model(cfg, torch.bfloat16, device="cuda")
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=0)
    fast = kernel_engine(model, True).generate(PROMPTS, params)
    plain = kernel_engine(model, False).generate(PROMPTS, params)
    same = [f.token_ids == p.token_ids for f, p in zip(fast, plain, strict=True)]
    assert sum(same) >= len(PROMPTS) - 1  # bf16 summation order may flip a near-tie
    for f, p in zip(fast, plain, strict=True):
        pairs = zip(f.token_ids, p.token_ids, strict=False)
        shorter = min(len(f.token_ids), len(p.token_ids))
        agree = next((i for i, (a, b) in enumerate(pairs) if a != b), shorter)
        for a, b in zip(f.logprobs[:agree], p.logprobs[:agree], strict=True):
            assert abs(a.logprob - b.logprob) < 0.05


def test_a_block_fp8_checkpoint_serves_with_fp8_attention_linears_on_the_gpu(tmp_path):
    # Widths of whole 512-column block rows, as cuBLASLt's 128 x 128 block scaling wants.
    cfg = small_config(hidden_size=512, share_q_dim=512, num_attention_heads=16, head_dim=32)
    write_random_weights(tmp_path, cfg, dtype=torch.bfloat16, fp8=True, seed=2, progress=False)
    keep = fp8_weights_on("cuda")
    fp8_tensors = load_weights(tmp_path, cfg, dtype=torch.bfloat16, device="cuda", keep_fp8=keep)
    fp8 = build_model(cfg, fp8_tensors)
    wide = build_model(cfg, load_weights(tmp_path, cfg, dtype=torch.bfloat16, device="cuda"))
    o_proj = fp8.attention.layers[1].self_attn.o_proj
    assert isinstance(o_proj, Fp8Linear) and o_proj.scaling == "blockwise"
    assert o_proj.weight.dtype == torch.float8_e4m3fn  # half the bytes of the bf16 weight
    prompt = list(range(5, 80, 5))
    a, b = reference_logits(fp8, prompt).float(), reference_logits(wide, prompt).float()
    assert ((a - b).norm() / b.norm()).item() < 0.1  # the activations' e4m3 rounding
    # And the engine serves it, decode kernel and FP8 GEMMs together.
    outputs = kernel_engine(fp8, True).generate(PROMPTS[:3], GREEDY)
    assert all(len(out.token_ids) >= 1 for out in outputs)


def test_an_fp8_kv_cache_serves_through_the_decode_kernel_and_tracks_bf16():
    cfg = small_config(num_attention_heads=16, head_dim=32)
    model = random_model(cfg, torch.bfloat16, device="cuda")
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=0, ignore_eos=True)

    def engine(kv: str):
        config = EngineConfig(
            block_size=16, num_kv_blocks=64, kv_cache_dtype=kv,
            scheduler=SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=24),
        )  # fmt: skip
        return local_engine(model, config)

    fp8_engine = engine("fp8")
    assert fp8_engine.runner.cache.k.dtype == torch.float8_e4m3fn
    assert fp8_engine.runner.cache.decode_kernel  # decode rows read FP8 in the kernel
    fp8, wide = fp8_engine.generate(PROMPTS, params), engine("auto").generate(PROMPTS, params)
    first_agree = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(fp8, wide, strict=True))
    assert first_agree >= len(PROMPTS) - 1
    for a, b in zip(fp8, wide, strict=True):
        pairs = zip(a.token_ids, b.token_ids, strict=True)
        agree = next((i for i, (x, y) in enumerate(pairs) if x != y), len(a.token_ids))
        for x, y in zip(a.logprobs[:agree], b.logprobs[:agree], strict=True):
            assert abs(x.logprob - y.logprob) < 0.3  # e4m3 K/V: ~3% a value
