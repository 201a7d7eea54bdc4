"""Routed experts in the checkpoint's block FP8 (`model/block_fp8_moe.py`): the Triton and
DeepGEMM path against the same computation in plain torch, and against the dequantised
experts, on fresh random inputs; shards of an expert set and a shard no token chose."""

from __future__ import annotations

import pytest
import torch

from services.common.kernels import grouped_gemm
from services.common.kernels.fp8 import quantize_block_fp8
from services.common.model import block_fp8_moe as block
from services.common.model.build import build_model, fp8_weights_on
from services.common.model.checkpoint_writer import write_random_weights
from services.common.model.ffn_half import BlockFp8RoutedExperts
from services.common.model.fp8_moe import Fp8Experts, fp8_grouped_expert_forward
from services.common.model.moe import looped_expert_forward, route
from services.common.model.reference import reference_logits
from services.common.model.weights import load_weights
from tests.support.models import small_config

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
pytestmark = pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
needs_deep_gemm = pytest.mark.skipif(
    not (HOPPER and grouped_gemm.available("cuda")),
    reason="DeepGEMM (sgl-deep-gemm) does not load here: it needs torch >= 2.12",
)
# The Triton GEMM always; DeepGEMM's where it loads (sgl-deep-gemm, built for torch >= 2.12).
KERNELS = {"triton": block.TRITON_OPS}
if torch.cuda.is_available() and grouped_gemm.available("cuda"):
    KERNELS["deep_gemm"] = block.DEEP_GEMM_OPS

HIDDEN, WIDTH, EXPERTS, TOP_K = 1024, 512, 16, 3
SHARDS = [(0, 16), (0, 4), (13, 3)]  # (first expert, how many)


def experts(count: int, seed: int) -> block.BlockFp8Experts:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, device="cuda", generator=g) * shape[-1] ** -0.5

    gate, up, down = w(count, WIDTH, HIDDEN), w(count, WIDTH, HIDDEN), w(count, HIDDEN, WIDTH)
    (gq, gs), (uq, us), (dq, ds) = (quantize_block_fp8(t) for t in (gate, up, down))
    return block.BlockFp8Experts.stack(gq, gs, uq, us, dq, ds)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("ops", KERNELS.values(), ids=KERNELS.keys())
@pytest.mark.parametrize("shard", SHARDS)
@pytest.mark.parametrize("tokens", [1, 37, 512])
def test_kernels_compute_what_plain_torch_computes(shard, tokens, ops):
    first, count = shard
    ex = experts(count, seed=tokens + first)
    weights, ids = route(torch.randn(tokens, EXPERTS, device="cuda"), TOP_K, False)
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    out = block.block_expert_forward(x, weights, ids, ex, first, EXPERTS, ops)
    ref = block.block_expert_forward(x, weights, ids, ex, first, EXPERTS, block.REFERENCE_OPS)
    assert out.shape == (tokens, HIDDEN) and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    local = ((ids >= first) & (ids < first + count)).any()
    if not local:  # no token chose this shard: nothing to add
        assert out.abs().max().item() == 0
    else:  # same quantised operands; bf16 outputs and fp32 accumulation order differ
        assert rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("ops", KERNELS.values(), ids=KERNELS.keys())
def test_block_scales_lose_less_than_requantised_rows(ops):
    """Against the dequantised experts in float32: the checkpoint's block scales as they are
    beat requantising to one scale per row (fp8_moe.Fp8Experts, the older path)."""
    ex = experts(EXPERTS, seed=3)
    weights, ids = route(torch.randn(2048, EXPERTS, device="cuda"), TOP_K, False)
    x = torch.randn(2048, HIDDEN, device="cuda", dtype=torch.bfloat16)
    gate, up, down = ex.dequantized()
    ref = looped_expert_forward(x.float(), weights, ids, gate, up, down)
    out = block.block_expert_forward(x, weights, ids, ex, 0, EXPERTS, ops)
    rows = fp8_grouped_expert_forward(x, weights, ids, Fp8Experts.quantize(gate, up, down))
    err, err_rows = rel_err(out, ref), rel_err(rows, ref)
    print(f"block scales {err:.4f}, requantised rows {err_rows:.4f}")
    assert err < 0.06 and err < err_rows


@needs_deep_gemm
def test_the_kernels_are_chosen_where_deep_gemm_loads():
    forward = block.block_expert_forward_on(torch.device("cuda"))
    assert forward.keywords["ops"] is block.DEEP_GEMM_OPS


@needs_deep_gemm
def test_a_block_fp8_checkpoint_serves_its_experts_as_stored(tmp_path):
    """The loader hands the experts over in e4m3 with their scales (never widened), the model
    holds them so, and its logits track the widened checkpoint's."""
    cfg = small_config(hidden_size=512, moe_intermediate_size=256, share_expert_dim=256)
    write_random_weights(tmp_path, cfg, dtype=torch.bfloat16, fp8=True, seed=3, progress=False)
    keep = fp8_weights_on("cuda")
    assert keep("model.layers.1.moe.gate_proj.weight")
    tensors = load_weights(tmp_path, cfg, dtype=torch.bfloat16, device="cuda", keep_fp8=keep)
    fp8 = build_model(cfg, tensors)
    wide = build_model(cfg, load_weights(tmp_path, cfg, dtype=torch.bfloat16, device="cuda"))
    moe = fp8.ffn.layers[cfg.moe_layers[0]].moe
    assert isinstance(moe, BlockFp8RoutedExperts)
    assert moe.experts.gate_up.dtype == torch.float8_e4m3fn
    assert moe.expert_forward.keywords["ops"] is block.DEEP_GEMM_OPS
    prompt = list(range(5, 80, 5))
    a, b = reference_logits(fp8, prompt).float(), reference_logits(wide, prompt).float()
    assert ((a - b).norm() / b.norm()).item() < 0.1  # the activations' e4m3 rounding
