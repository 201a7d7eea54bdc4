"""The disaggregated cluster over NCCL: one GPU per instance, the same code as on gloo, the
same tokens as the single-process engine on a GPU. Needs two CUDA GPUs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.attention.builder import local_engine
from services.attention.engine import EngineConfig
from services.common.model.build import load_model
from services.common.sampling_params import SamplingParams
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


@pytest.mark.parametrize("k", [1, 3])
def test_nccl_cluster_equals_single_process_on_gpu(checkpoint, k):
    model = load_model(checkpoint, dtype="float32", device="cuda:0", progress=False)
    expected = local_engine(model, EngineConfig()).generate(PROMPTS, PARAMS)
    del model
    cluster = Cluster(
        "--model",
        str(checkpoint),
        "--device",
        "cuda",
        "--dtype",
        "float32",
        "--attention-instances",
        "1",
        "--ffn-instances",
        "1",
        "--micro-batches",
        str(k),
    )
    try:
        results = cluster.generate_all(PROMPTS, PARAMS)
    finally:
        assert cluster.stop() == 0
    assert [r.token_ids for r in results] == [e.token_ids for e in expected]
    for result, reference in zip(results, expected, strict=True):
        for got, want in zip(result.logprobs, reference.logprobs, strict=True):
            assert got == pytest.approx(want.logprob, abs=1e-3)
    assert wait_until_gone(str(checkpoint)) == []
