"""The fused FP8 attention layer (`Fp8MFAAttention`) against the unfused one it replaces, at
Step-3's real shapes, on fresh random weights and inputs.

Both run the same blockwise `Fp8Linear`s; the fused layer quantises inside the RMSNorm kernel,
multiplies q|k|v as one GEMM (the split-K Triton kernel where its rule says so, cuBLASLt
elsewhere) and adds the residual in o_proj's last kernel. The e4m3 operands are the same up to
rare one-step flips where the norm's last bit differs, and the GEMMs sum in another order, so
the outputs agree to 1e-2 relative (the attention branch alone: ~2e-3 seen); the residual
stream itself, much larger, to far less. Skips without a GPU and Triton.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from services.common.kernels.fp8 import quantize_block_fp8
from services.common.model.attention import MFAAttention, causal_attention
from services.common.model.fp8_attention import Fp8MFAAttention, fuse_attention
from services.common.model.fp8_linear import Fp8Linear
from services.common.model.layers import RMSNorm, rope_cos_sin
from services.common.presets import step3_config

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="needs a CUDA GPU and Triton",
)

CFG = step3_config(1)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def layers():
    """(unfused, fused) sharing one set of random block-FP8 weights."""
    with torch.device("cuda"):
        attn = MFAAttention(CFG, layer=0)
        norm = RMSNorm(CFG.hidden_size, CFG.rms_norm_eps)
    norm.weight.data = 1 + 0.1 * torch.randn_like(norm.weight)
    attn.inter_norm.weight.data = 1 + 0.1 * torch.randn_like(attn.inter_norm.weight)
    for name in ("q_proj", "k_proj", "v_proj", "wq", "o_proj"):
        w = torch.randn_like(getattr(attn, name).weight) * CFG.hidden_size**-0.5
        setattr(attn, name, Fp8Linear.from_block_fp8(*quantize_block_fp8(w), "blockwise"))
    holder = torch.nn.Sequential(attn)
    keys = set(holder.state_dict())
    assert fuse_attention(holder) == 1
    fused = holder[0]
    assert isinstance(fused, Fp8MFAAttention) and set(holder.state_dict()) == keys
    # The projections now view the fused weight: nothing held twice.
    assert fused.q_proj.weight.data_ptr() == fused.qkv.weight.data_ptr()
    return attn, fused, norm


@pytest.mark.parametrize("tokens", [1, 37, 64, 200])
def test_fused_layer_matches_the_unfused_one(layers, tokens):
    attn, fused, norm = layers
    x = torch.randn(tokens, CFG.hidden_size, device="cuda").bfloat16()
    cos, sin = rope_cos_sin(torch.arange(tokens, device="cuda"), CFG.head_dim, CFG.rope_theta)
    seen = {}

    def backend(layer, q, k, v):  # the new tokens attend among themselves
        seen.setdefault("kv", []).append((k.clone(), v.clone()))
        return causal_attention(q, k, v, CFG.head_dim**-0.5, q_offset=0)

    expected = attn(norm(x), cos, sin, backend)  # the unfused branch
    branch = fused.branch(x, norm, cos, sin, backend)
    assert branch.shape == expected.shape and branch.dtype == torch.bfloat16
    branch_err = rel_err(branch, expected)
    assert branch_err < 1e-2, f"attention branch: {branch_err:.2e}"
    (k_ref, v_ref), (k, v) = seen["kv"]
    assert rel_err(k, k_ref) < 1e-2 and rel_err(v, v_ref) < 1e-2  # what the cache would get
    # With the residual: the same branch added to x in bf16, as `x + branch` rounds.
    out = fused.residual_forward(x, norm, cos, sin, backend)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, x + branch, rtol=1e-2, atol=1e-2)


def test_fused_layer_replays_in_a_cuda_graph(layers):
    _, fused, norm = layers
    x = torch.randn(64, CFG.hidden_size, device="cuda").bfloat16()
    cos, sin = rope_cos_sin(torch.full((64,), 5, device="cuda"), CFG.head_dim, CFG.rope_theta)

    def backend(layer, q, k, v):
        return causal_attention(q, k, v, CFG.head_dim**-0.5, q_offset=0)

    expected = fused.residual_forward(x, norm, cos, sin, backend)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused.residual_forward(x, norm, cos, sin, backend)
    out.fill_(float("nan"))
    graph.replay()
    assert torch.equal(out, expected)
