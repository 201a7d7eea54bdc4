"""The attention-to-FFN message layout: exact for plain dtypes, e4m3-close for FP8."""

import pytest
import torch

from services.common.activations import Layout
from services.common.kernels.fp8 import quantize_fp8


@pytest.mark.parametrize("top_k", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_unpack_round_trip_is_exact(dtype, top_k):
    layout = Layout(hidden_size=16, top_k=top_k, dtype=dtype, fp8=False)
    h = torch.randn(5, 16).to(dtype)
    ids = torch.randint(0, 48, (5, top_k))
    weights = torch.rand(5, top_k)
    buffer = torch.empty(100 * layout.bytes_per_token, dtype=torch.uint8)
    message = layout.pack(buffer, h, ids if top_k else None, weights if top_k else None)
    assert message.numel() == 5 * (16 * dtype.itemsize + top_k * 8)
    got_h, got_ids, got_weights = layout.unpack(message.clone(), 5)
    assert torch.equal(got_h, h)
    if top_k:
        assert torch.equal(got_ids, ids) and torch.equal(got_weights, weights)


def test_fp8_dispatch_is_one_byte_per_value_plus_a_scale_per_token():
    layout = Layout(hidden_size=64, top_k=3, dtype=torch.float32, fp8=True)
    assert layout.bytes_per_token == 64 + 4 + 3 * 8
    h = torch.randn(7, 64) * torch.logspace(-3, 3, 7)[:, None]  # very different token scales
    buffer = torch.empty(7 * layout.bytes_per_token, dtype=torch.uint8)
    ids, weights = torch.randint(0, 8, (7, 3)), torch.rand(7, 3)
    got, got_ids, _ = layout.unpack(layout.pack(buffer, h, ids, weights), 7)
    # Per-token scales: each row's error is bounded by its own amax (e4m3: 3 mantissa bits).
    error = (got - h).abs().amax(dim=-1) / h.abs().amax(dim=-1)
    assert (error <= 2**-4).all()
    assert torch.equal(got_ids, ids)


def test_fp8_quantisation_of_zero_rows_is_safe():
    q, scales = quantize_fp8(torch.zeros(2, 8))
    assert torch.isfinite(scales).all() and (q.float() == 0).all()
