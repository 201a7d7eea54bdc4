"""The FP8 linear against its dequantised reference, on fresh random inputs.

CUDA tests run at Step-3's attention shapes and skip without a GPU; the reference path's tests
run on CPU too. Weights and activations get log-normal per-row and per-column factors, so the
128 x 128 weight blocks and 1 x 128 activation groups have scales spread over e^+-2: a scale
read from the wrong block or group shows as a large error, not a rounding one.

Error bounds, ||out - ref|| / ||ref||:
- GEMM on the same FP8 operands against float64: 5e-3. cuBLASLt accumulates in fp32 and
  rounds once to bf16 (~1e-3 relative); nothing else differs.
- Whole layer against the unquantised float64 product x @ W^T (W the block-dequantised
  checkpoint): 4e-2 for blockwise (1 x 128 e4m3 activations: ~2.1% on these inputs, 2^-4 per
  value at worst), 6e-2 for rowwise (one scale per token and the requantised weight: ~3.7%).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from services.common.kernels.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_activation,
    dequantize_block_fp8,
    quantize_activation_reference,
    quantize_block_fp8,
)
from services.common.kernels.quantize import quantize_activation
from services.common.model.fp8_linear import Fp8Linear, fuse_outputs, pick_scaling

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="needs a CUDA GPU and Triton",
)

# Step-3 attention: q_proj, wq (64 x 256), k_proj / v_proj, o_proj; and q|k|v fused.
SHAPES = {
    "q_proj": (7168, 2048),
    "wq": (2048, 16384),
    "kv_proj": (7168, 256),
    "o_proj": (16384, 7168),
    "qkv_fused": (7168, 2560),
}
GEMM_REL_ERR = 5e-3
LAYER_REL_ERR = {"blockwise": 4e-2, "rowwise": 6e-2, "reference": 4e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def random_block_fp8(out_features: int, in_features: int, device, gen):
    """A block-FP8 (weight, weight_scale_inv) pair whose blocks have spread-out scales."""

    def lognormal(*shape):
        return torch.exp(0.5 * torch.randn(*shape, generator=gen, device=device))

    w = torch.randn(out_features, in_features, generator=gen, device=device)
    w = w * in_features**-0.5 * lognormal(out_features, 1) * lognormal(1, in_features)
    return quantize_block_fp8(w)


def random_activations(tokens: int, features: int, device, gen) -> torch.Tensor:
    x = torch.randn(tokens, features, generator=gen, device=device)
    return (x * torch.exp(torch.randn(1, features, generator=gen, device=device))).bfloat16()


def fresh_generator(device) -> torch.Generator:
    return torch.Generator(device).manual_seed(int(torch.randint(2**31, ()).item()))


# --- the reference path, on CPU -------------------------------------------------------------


def test_reference_quantiser_round_trips_within_e4m3_rounding():
    gen = torch.Generator().manual_seed(1)
    x = random_activations(5, 512, "cpu", gen)
    x[2, 128:256] = 0  # an all-zero group: scale 1, not 0/0
    q, scale = quantize_activation_reference(x, 128)
    assert q.dtype == FP8_DTYPE and q.shape == (5, 512)
    assert scale.shape == (5, 4) and scale.stride() == (1, 5)  # column-major, as cuBLASLt reads
    assert scale[2, 1] == 1 and (q[2, 128:256].float() == 0).all()
    assert rel_err(dequantize_activation(q, scale), x) < 4e-2
    # Each group's largest value lands on the top of the e4m3 range.
    assert (q.float().abs().view(5, 4, 128).amax(-1)[scale != 1] == FP8_MAX).all()
    padded, padded_scale = quantize_activation_reference(x, 128, row_multiple=8)
    assert padded.shape == (8, 512) and padded_scale.shape == (8, 4)
    assert torch.equal(padded[:5].float(), q.float()) and (padded[5:].float() == 0).all()


def test_reference_layer_matches_the_dequantised_matmul():
    gen = torch.Generator().manual_seed(2)
    weight, scale_inv = random_block_fp8(384, 512, "cpu", gen)
    layer = Fp8Linear.from_block_fp8(weight, scale_inv, "reference")
    x = random_activations(7, 512, "cpu", gen)
    w = dequantize_block_fp8(weight, scale_inv, dtype=torch.float64)
    out = layer(x.view(7, 1, 512))
    assert out.shape == (7, 1, 384) and out.dtype == torch.bfloat16
    assert rel_err(out.view(7, 384), x.double() @ w.T) < LAYER_REL_ERR["reference"]
    xq, x_scale = quantize_activation_reference(x, 128)
    same_operands = dequantize_activation(xq, x_scale).double() @ w.T
    assert rel_err(out.view(7, 384), same_operands) < GEMM_REL_ERR


def test_rowwise_requantisation_error_is_that_of_one_more_e4m3_rounding():
    gen = torch.Generator().manual_seed(3)
    weight, scale_inv = random_block_fp8(256, 1024, "cpu", gen)
    rowwise = Fp8Linear.from_block_fp8(weight, scale_inv, "rowwise")
    assert rowwise.weight.dtype == FP8_DTYPE and rowwise.weight_scale.shape == (256,)
    w = dequantize_block_fp8(weight, scale_inv, dtype=torch.float32)
    assert rel_err(rowwise.dequantized_weight(), w) < 4e-2


def test_fused_outputs_dequantise_to_the_stacked_weights():
    gen = torch.Generator().manual_seed(4)
    pairs = [random_block_fp8(n, 512, "cpu", gen) for n in (256, 128, 128)]
    weight, scale_inv = fuse_outputs(*pairs)
    stacked = torch.cat([dequantize_block_fp8(w, s) for w, s in pairs])
    assert torch.equal(dequantize_block_fp8(weight, scale_inv), stacked)
    with pytest.raises(ValueError, match="out dims"):
        fuse_outputs(pairs[0], (pairs[1][0][:100], pairs[1][1]))


# --- the FP8 GEMMs, on CUDA -----------------------------------------------------------------


def scalings() -> list[str]:
    """Rowwise always; blockwise where this GPU's cuBLASLt has it."""
    if not torch.cuda.is_available():
        return ["rowwise"]
    return ["blockwise", "rowwise"] if pick_scaling("cuda") == "blockwise" else ["rowwise"]


@pytest.fixture(scope="module")
def weights():
    """Step-3-sized block-FP8 weights, built once per shape (inputs stay fresh per test)."""
    made = {}

    def get(name: str):
        if name not in made:
            in_features, out_features = SHAPES[name]
            gen = fresh_generator("cuda")
            made[name] = random_block_fp8(out_features, in_features, "cuda", gen)
        return made[name]

    return get


@needs_cuda
@pytest.mark.parametrize("row_multiple", [1, 16])
@pytest.mark.parametrize("group", [128, 7168, 16384])
@pytest.mark.parametrize("tokens", [64, 1, 37])
def test_triton_quantiser_matches_torch(tokens, group, row_multiple):
    features = 16384 if group == 16384 else 7168
    x = random_activations(tokens, features, "cuda", fresh_generator("cuda"))
    x = torch.cat([x, x], dim=1)[:, :features]  # a row stride other than K
    q, scale = quantize_activation(x, group, row_multiple)
    q_ref, scale_ref = quantize_activation_reference(x, group, row_multiple)
    rows = -(-tokens // row_multiple) * row_multiple
    assert q.shape == (rows, features) and scale.shape == scale_ref.shape
    assert scale.t().is_contiguous()  # column-major, as cuBLASLt reads it
    assert (q[tokens:].float() == 0).all() and (scale[tokens:] == 1).all()  # the padding rows
    torch.testing.assert_close(scale, scale_ref, rtol=5e-7, atol=0)
    # Division may differ by an ulp, flipping a rare tie by one e4m3 step.
    differ = (q.float() != q_ref.float()).float().mean().item()
    assert differ < 1e-3, f"{differ:.1e} of the values differ"
    assert rel_err(dequantize_activation(q, scale), dequantize_activation(q_ref, scale_ref)) < 1e-3


@needs_cuda
@pytest.mark.parametrize("tokens", [64, 1, 37, 60, 256])
@pytest.mark.parametrize("scaling", scalings())
@pytest.mark.parametrize("shape", SHAPES.keys())
def test_fp8_gemm_matches_reference(weights, shape, scaling, tokens):
    weight, scale_inv = weights(shape)
    layer = Fp8Linear.from_block_fp8(weight, scale_inv, scaling)
    in_features, out_features = SHAPES[shape]
    x = random_activations(tokens, in_features, "cuda", fresh_generator("cuda"))

    xq, x_scale = layer.quantize_input(x)  # padded with zero rows to a multiple of 16
    out = layer.matmul(xq, x_scale)[:tokens]
    assert out.shape == (tokens, out_features) and out.dtype == torch.bfloat16
    w64 = layer.dequantized_weight().double()
    same_operands = dequantize_activation(xq[:tokens], x_scale[:tokens]).double() @ w64.T
    gemm_err = rel_err(out, same_operands)
    checkpoint = dequantize_block_fp8(weight, scale_inv, dtype=torch.float64)
    layer_err = rel_err(layer(x), x.double() @ checkpoint.T)
    print(f"{shape} {scaling} T={tokens}: GEMM {gemm_err:.2e}, layer {layer_err:.2e}")  # pytest -s
    assert gemm_err < GEMM_REL_ERR, f"GEMM vs float64 on the same FP8 operands: {gemm_err:.2e}"
    assert layer_err < LAYER_REL_ERR[scaling], f"layer vs unquantised x @ W^T: {layer_err:.2e}"


@needs_cuda
def test_fp8_linear_replays_in_a_cuda_graph(weights):
    layer = Fp8Linear.from_block_fp8(*weights("qkv_fused"), pick_scaling("cuda"))
    gen = fresh_generator("cuda")
    x = random_activations(64, 7168, "cuda", gen)
    layer(x)  # compiles the quantiser outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    x.copy_(random_activations(64, 7168, "cuda", gen))
    graph.replay()
    assert rel_err(out, layer(x)) < 1e-3  # the replay read the new x, not the captured one
