"""The disaggregated cluster over NCCL: one GPU per instance, the same code as on gloo, the
same tokens as the single-process engine on a GPU. Needs two CUDA GPUs.

In float32 both sides run eagerly; in bf16 at widths the MFA decode kernel takes, the
attention instance replays its decode segments from CUDA graphs between the NCCL transfers
(segment_graphs.py) and the FFN instance its layers (ffn_graphs.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from services.attention.builder import local_engine
from services.attention.engine import EngineConfig
from services.common.model.build import load_model
from services.common.model.checkpoint_writer import write_random_weights
from services.common.presets import tiny_config
from services.common.sampling_params import SamplingParams
from services.common.tokenizer_files import write_tokenizer_files
from tests.support.cluster import Cluster, afd, wait_until_gone

pytestmark = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (one per instance)"
)

PARAMS = SamplingParams(max_tokens=8, temperature=0.0, logprobs=1, ignore_eos=True)
PROMPTS = [[5 + i * 40 + j for j in range(n)] for i, n in enumerate((2, 17, 40, 5, 90))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("afd-nccl") / "tiny"
    assert afd("init-checkpoint", str(path), "--preset", "tiny").wait() == 0
    return path


def served(checkpoint: Path, dtype: str, k: int):
    """(the single-process engine's completions on GPU 0, the 1 x 1 NCCL cluster's)."""
    model = load_model(checkpoint, dtype=dtype, device="cuda:0", progress=False)
    expected = local_engine(model, EngineConfig()).generate(PROMPTS, PARAMS)
    del model
    torch.cuda.empty_cache()
    cluster = Cluster(
        "--model", str(checkpoint), "--device", "cuda", "--dtype", dtype,
        "--attention-instances", "1", "--ffn-instances", "1", "--micro-batches", str(k),
    )  # fmt: skip
    try:
        results = cluster.generate_all(PROMPTS, PARAMS)
    finally:
        assert cluster.stop() == 0
    assert wait_until_gone(str(checkpoint)) == []
    return expected, results


@pytest.mark.parametrize("k", [1, 3])
def test_nccl_cluster_equals_single_process_on_gpu(checkpoint, k):
    expected, results = served(checkpoint, "float32", k)
    assert [r.token_ids for r in results] == [e.token_ids for e in expected]
    for result, reference in zip(results, expected, strict=True):
        for got, want in zip(result.logprobs, reference.logprobs, strict=True):
            assert got == pytest.approx(want.logprob, abs=1e-3)


@pytest.fixture(scope="module")
def graphable(tmp_path_factory) -> Path:
    """A bf16 checkpoint the decode kernel serves (16 query heads of 32 dimensions)."""
    path = tmp_path_factory.mktemp("afd-nccl-graphs") / "tiny16"
    path.mkdir()
    cfg = dataclasses.replace(tiny_config(), num_attention_heads=16, head_dim=32)
    (path / "config.json").write_text(json.dumps(cfg.to_vl_config(), indent=2))
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids)}
    (path / "generation_config.json").write_text(json.dumps(generation))
    write_tokenizer_files(path, model_max_length=cfg.max_position_embedding)
    write_random_weights(path, cfg, dtype=torch.bfloat16, progress=False)
    return path


@pytest.mark.parametrize("k", [1, 3])
def test_segment_graphs_over_nccl_give_the_engines_tokens(graphable, k):
    expected, results = served(graphable, "bfloat16", k)
    # bf16 sums in another order (padded buckets, split batches) may flip one near-tie.
    same = [r.token_ids == e.token_ids for r, e in zip(results, expected, strict=True)]
    assert sum(same) >= len(same) - 1
    for result, reference, agree in zip(results, expected, same, strict=True):
        if agree:
            for got, want in zip(result.logprobs, reference.logprobs, strict=True):
                assert got == pytest.approx(want.logprob, abs=0.05)
