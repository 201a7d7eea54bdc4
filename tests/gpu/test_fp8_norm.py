"""RMSNorm fused with 1 x 128 e4m3 quantisation against the two plain-torch steps, on fresh random
inputs at Step-3's norm widths (hidden 7168, share_q_dim 2048) and strided rows (inter_norm
reads q_low as a view of the fused q|k|v output).

Bounds: the scales to 1e-6 relative (both compute amax / 448 in float32 from the same bf16 norm
output, which may differ by one bf16 ulp, 2^-8, in rare elements: at most 1% of them); the e4m3
values dequantised to 1e-3 relative of each other (a one-ulp norm difference can flip one e4m3
rounding). Skips without a GPU and Triton.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from services.common.kernels.fp8 import dequantize_activation
from services.common.kernels.fp8_norm import (
    rms_norm_quantize,
    rms_norm_quantize_reference,
    sum_rms_norm_quantize,
    sum_rms_norm_quantize_reference,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="needs a CUDA GPU and Triton",
)


@pytest.mark.parametrize("row_multiple", [1, 16])
@pytest.mark.parametrize("tokens", [1, 37, 64, 256])
@pytest.mark.parametrize("width", [7168, 2048, 384])
def test_matches_norm_then_quantise(width, tokens, row_multiple):
    gen = torch.Generator("cuda").manual_seed(int(torch.randint(2**31, ()).item()))
    wide = torch.randn(tokens, width + 512, generator=gen, device="cuda") * 3
    x = wide.bfloat16()[:, :width]  # rows strided, as q_low's are
    weight = 1 + 0.1 * torch.randn(width, generator=gen, device="cuda")
    q, scale = rms_norm_quantize(x, weight, 1e-5, row_multiple)
    q_ref, scale_ref = rms_norm_quantize_reference(x, weight, 1e-5, row_multiple)
    rows = -(-tokens // row_multiple) * row_multiple
    assert q.shape == q_ref.shape == (rows, width) and scale.shape == (rows, width // 128)
    assert scale.t().is_contiguous()  # column-major, as the GEMMs read it
    assert (q[tokens:].float() == 0).all() and (scale[tokens:] == 1).all()
    scale_rel = (scale / scale_ref - 1).abs()
    assert (scale_rel > 1e-6).float().mean().item() < 1e-2 and scale_rel.max().item() < 2**-7
    differ = (q.float() != q_ref.float()).float().mean().item()
    assert differ < 1e-2, f"{differ:.1e} of the values differ"
    a, b = dequantize_activation(q, scale), dequantize_activation(q_ref, scale_ref)
    assert ((a - b).norm() / b.norm()).item() < 1e-3


@pytest.mark.parametrize("splits", [1, 6])
@pytest.mark.parametrize("tokens", [1, 37, 64])
def test_partials_summed_then_normed_and_quantised(tokens, splits):
    """The q|k|v GEMM's partial sums, its bf16 output and inter_norm's quantised q_low in one
    kernel, against the three steps in torch (bounds as above)."""
    gen = torch.Generator("cuda").manual_seed(int(torch.randint(2**31, ()).item()))
    partials = torch.randn(splits, tokens, 2560, generator=gen, device="cuda") * 2
    weight = 1 + 0.1 * torch.randn(2048, generator=gen, device="cuda")
    y, q, scale = sum_rms_norm_quantize(partials, 2048, weight, 1e-5, 16)
    y_ref, q_ref, scale_ref = sum_rms_norm_quantize_reference(partials, 2048, weight, 1e-5, 16)
    torch.testing.assert_close(y, y_ref, rtol=2**-7, atol=1e-5)  # fp32 sums in another order
    rows = -(-tokens // 16) * 16
    assert q.shape == (rows, 2048) and scale.shape == (rows, 16) and scale.t().is_contiguous()
    assert (q[tokens:].float() == 0).all() and (scale[tokens:] == 1).all()
    a, b = dequantize_activation(q, scale), dequantize_activation(q_ref, scale_ref)
    assert ((a - b).norm() / b.norm()).item() < 1e-3
