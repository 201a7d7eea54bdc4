"""The Triton split-K block-FP8 GEMM against its plain-torch reference, on fresh random inputs.

Operands are e4m3 with block scales spread over e^+-2 (a scale read from the wrong block or
group shows as a large error). Bounds, ||out - ref|| / ||ref|| against float64 on the same
FP8 operands:
- partials summed in fp32: 1e-3. The tensor cores keep only ~14 bits while accumulating one
  128-wide K step (DeepSeek-V3, section 3.3.2); each step is promoted to fp32, so the error
  stays near 1e-4 instead of growing with K.
- through `sum_partials` to bf16: 5e-3 (one bf16 rounding, ~2e-3 relative).
Skips without a GPU and Triton.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from services.common.kernels.fp8 import quantize_block_fp8
from services.common.kernels.fp8_gemm import gemm_partials, gemm_reference, sum_partials
from services.common.kernels.quantize import quantize_activation

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="needs a CUDA GPU and Triton",
)

# (N, K): Step-3's fused q|k|v, wq, o_proj, k_proj alone; and a ragged N.
SHAPES = [(2560, 7168), (16384, 2048), (7168, 16384), (256, 7168), (200, 384)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def operands(m: int, n: int, k: int):
    gen = torch.Generator("cuda").manual_seed(int(torch.randint(2**31, ()).item()))

    def lognormal(*shape):
        return torch.exp(0.5 * torch.randn(*shape, generator=gen, device="cuda"))

    w = torch.randn(n, k, generator=gen, device="cuda") * lognormal(n, 1) * lognormal(1, k)
    weight, weight_scale = quantize_block_fp8(w)
    x = torch.randn(m, k, generator=gen, device="cuda") * lognormal(1, k)
    xq, x_scale = quantize_activation(x.bfloat16(), 128)  # column-major scales, as the layer's
    return xq, x_scale, weight, weight_scale.float()


KERNELS = [  # (block_n, split_k, tma, warp_specialize)
    (128, 1, False, False),
    (64, 3, False, False),
    (128, 8, True, False),
    (64, 3, True, False),
    (64, 6, True, True),
]


@pytest.mark.parametrize(("block_n", "split_k", "tma", "ws"), KERNELS)
@pytest.mark.parametrize("m", [1, 16, 37, 64, 200])
@pytest.mark.parametrize("shape", SHAPES)
def test_partials_sum_to_the_reference(shape, m, block_n, split_k, tma, ws):
    n, k = shape
    xq, x_scale, weight, weight_scale = operands(m, n, k)
    partials = gemm_partials(
        xq, x_scale, weight, weight_scale, split_k, block_n=block_n, tma=tma, warp_specialize=ws
    )
    assert partials.shape == (min(split_k, k // 128), m, n)
    ref = gemm_reference(xq, x_scale.double(), weight, weight_scale.double())
    err = rel_err(partials.sum(0), ref)
    assert err < 1e-3, f"{err:.2e}"
    out = sum_partials(partials)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert rel_err(out, ref) < 5e-3


@pytest.mark.parametrize("m", [3, 64])
def test_sum_partials_adds_the_residual_after_rounding_the_branch(m):
    partials = torch.randn(4, m, 7168, device="cuda")
    residual = torch.randn(m, 7168, device="cuda").bfloat16()
    expected = residual + partials.sum(0).bfloat16()  # what `x + o_proj(a)` computes
    out = sum_partials(partials, residual)
    torch.testing.assert_close(out, expected, rtol=8e-3, atol=1e-2)


def test_gemm_replays_in_a_cuda_graph():
    xq, x_scale, weight, weight_scale = operands(64, 2560, 7168)
    expected = sum_partials(gemm_partials(xq, x_scale, weight, weight_scale, 7))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sum_partials(gemm_partials(xq, x_scale, weight, weight_scale, 7))
    out.fill_(float("nan"))
    graph.replay()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("shape", [(16384, 2048), (200, 384)])
def test_unsplit_gemm_writes_bf16_itself(shape, m):
    """split_k = 1 with a bf16 output: the product straight from the GEMM, no sum kernel."""
    n, k = shape
    xq, x_scale, weight, weight_scale = operands(m, n, k)
    out = gemm_partials(xq, x_scale, weight, weight_scale, 1, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (1, m, n)
    ref = gemm_reference(xq, x_scale.double(), weight, weight_scale.double())
    assert rel_err(out[0], ref) < 5e-3
    fp32 = gemm_partials(xq, x_scale, weight, weight_scale, 1)
    assert torch.equal(out[0], fp32[0].bfloat16())  # the same sums, rounded once
