"""An FP8 linear layer that multiplies block-FP8 checkpoint weights without dequantising them.

    y = x @ W^T,  W ~= weight * weight_scale per 128 x 128 block   (DeepSeek-V3's layout)

The activations are quantised on the fly to float8_e4m3fn, one float32 scale per 128 values of a
token (1 x 128 groups), and `torch._scaled_mm` multiplies the two FP8 operands with their scales
in cuBLASLt, accumulating in fp32 and writing bf16. Three ways to do it, chosen at construction:

- "blockwise": the checkpoint's 128 x 128 weight scales as they are, 1 x 128 activation scales
  (cuBLASLt >= 12.9 on Hopper; `pick_scaling` probes for it). No error beyond the checkpoint's
  own and the activations' rounding to e4m3. For decode's few tokens on deep-K weights the
  same product runs as a split-K Triton GEMM instead (`fp8_gemm.py`), where its measured rule
  says that beats cuBLASLt.
- "rowwise": where blockwise is missing (Ada, older cuBLAS): the weight is requantised once, at
  load, to one scale per output channel, and each token gets one scale. Requantising adds about
  as much error as the block quantisation itself (2.6% relative on Gaussian weights); on the
  tests' inputs the layer's error against x @ W^T is ~3.7% rowwise against ~2.1% blockwise.
- "reference": plain torch, for CPU and for tests: the same 1 x 128 activation quantisation,
  then the dequantised operands multiplied in float32.

What this module does not know: checkpoint files and tensor names (the loader hands it a
(weight, weight_scale_inv) pair), or which layer it serves.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import Tensor, nn

from services.common import kernels
from services.common.kernels import fp8_gemm
from services.common.kernels.fp8 import (
    DEFAULT_BLOCK,
    FP8_DTYPE,
    GROUP,
    dequantize_activation,
    dequantize_block_fp8,
    quantize_activation_reference,
    quantize_rows_fp8,
)
from services.common.kernels.quantize import quantize_activation

Scaling = Literal["blockwise", "rowwise", "reference"]
# cuBLASLt (CUDA 13.0, H200) answers CUBLAS_STATUS_NOT_SUPPORTED to 1 x 128 scaling at T = 1 or
# 37 tokens but runs 64 and 256; likely its column-major activation scales need a 16-byte-aligned
# leading dimension (T floats; TransformerEngine pads them to a multiple of 4). Blockwise inputs
# get zero rows up to a multiple of 16, which covers either reading and costs nothing measurable.
BLOCKWISE_TOKEN_MULTIPLE = 16


class Fp8Linear(nn.Module):
    """x [..., in_features] (bf16/fp16/fp32) -> [..., out_features] bf16, no bias.

    Buffers: `weight` [out, in] float8_e4m3fn and `weight_scale` float32: [ceil(out/128),
    ceil(in/128)] per block ("blockwise", "reference") or [out] per output channel ("rowwise");
    dequantised weight = weight * weight_scale.
    """

    def __init__(self, weight: Tensor, weight_scale: Tensor, scaling: Scaling) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        if weight.dtype != FP8_DTYPE or weight_scale.dtype != torch.float32:
            raise ValueError(
                f"weight must be float8_e4m3fn and weight_scale float32, got {weight.dtype} "
                f"and {weight_scale.dtype}"
            )
        if scaling == "blockwise" and in_features % (4 * GROUP):
            # cuBLASLt wants the rows of the block-scale grid 16-byte aligned.
            raise ValueError(f"blockwise scaling needs in_features % 512 == 0, got {in_features}")
        if scaling != "rowwise" and in_features % GROUP:
            raise ValueError(f"1 x {GROUP} activation groups need in_features % {GROUP} == 0")
        self.scaling = scaling
        self.in_features, self.out_features = in_features, out_features
        self.group = in_features if scaling == "rowwise" else GROUP
        self.token_multiple = BLOCKWISE_TOKEN_MULTIPLE if scaling == "blockwise" else 1
        # Chosen once, for the device the weight lives on: the Triton kernels where they run.
        triton = kernels.available(weight.device)
        self.quantize = quantize_activation if triton else quantize_activation_reference
        self.triton_gemm = triton and scaling == "blockwise" and _has_tma(weight.device)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)

    @classmethod
    def from_block_fp8(
        cls, weight: Tensor, weight_scale_inv: Tensor, scaling: Scaling
    ) -> Fp8Linear:
        """A checkpoint's (weight [out, in] e4m3, weight_scale_inv [out/128, in/128]) pair.

        "blockwise" and "reference" keep both tensors as they are; "rowwise" requantises the
        weight to one scale per output channel (one float32 copy of the weight, once).
        """
        if scaling != "rowwise":
            return cls(weight, weight_scale_inv.float().contiguous(), scaling)
        w = dequantize_block_fp8(weight, weight_scale_inv, DEFAULT_BLOCK, torch.float32)
        return cls(*quantize_rows_fp8(w), scaling)

    def dequantized_weight(self) -> Tensor:
        """[out, in] float32."""
        if self.scaling == "rowwise":
            return self.weight.float() * self.weight_scale[:, None]
        return dequantize_block_fp8(self.weight, self.weight_scale, DEFAULT_BLOCK, torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)  # [T, in]
        if self.scaling == "reference":
            out = self.reference(flat)
        else:
            out = self.matmul(*self.quantize_input(flat))[: flat.shape[0]]
        return out.view(*x.shape[:-1], self.out_features)

    def quantize_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, in] -> (xq [T', in] e4m3, scale [T', in / group]) for `matmul`; T' is T rounded
        up to `token_multiple` with zero rows."""
        return self.quantize(x, self.group, self.token_multiple)

    def matmul(self, xq: Tensor, x_scale: Tensor, residual: Tensor | None = None) -> Tensor:
        """xq [T', in] e4m3 and its scales [T', in / group] (column-major) -> [T', out] bf16,
        plus `residual` [T, out] bf16 in the first T rows if given (then [T, out]).

        T' must be a multiple of `token_multiple` (what `quantize_input` returns).
        """
        if xq.shape[0] % self.token_multiple:
            raise ValueError(
                f"{xq.shape[0]} token rows: pad to a multiple of {self.token_multiple}"
            )
        rows = xq.shape[0] if residual is None else residual.shape[0]
        split = self.split_k(rows, xq.device)
        if split == 1 and residual is None:  # the GEMM writes bf16 itself
            return fp8_gemm.gemm_partials(
                xq, x_scale, self.weight, self.weight_scale, 1, out_dtype=torch.bfloat16
            )[0]
        if split:
            partials = self.partials(xq[:rows], x_scale[:rows], split)
            return fp8_gemm.sum_partials(partials, residual)  # the residual add comes free
        if self.scaling == "blockwise":
            # cuBLASLt reads B = W^T [in, out] column-major and its 128x128 scale grid transposed:
            # both are views of the checkpoint's row-major tensors.
            w_scale = self.weight_scale.t()
        else:
            w_scale = self.weight_scale.view(1, -1)  # [1, out]
        out = torch._scaled_mm(
            xq, self.weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16
        )
        return out if residual is None else residual + out[:rows]

    def split_k(self, rows: int, device: torch.device) -> int:
        """How many K splits the Triton GEMM takes for `rows` tokens; 0 where cuBLASLt runs
        (the measured rule in `fp8_gemm.beats_cublas`)."""
        if self.triton_gemm and fp8_gemm.beats_cublas(
            rows, self.out_features, self.in_features, _num_sms(device)
        ):
            return fp8_gemm.split_for(self.out_features, self.in_features, _num_sms(device))
        return 0

    def partials(self, xq: Tensor, x_scale: Tensor, split: int) -> Tensor:
        """The Triton GEMM's fp32 partial sums [split, T, out] (their sum over dim 0 is the
        product), for a caller that fuses the sum into its next step; `split` from `split_k`."""
        return fp8_gemm.gemm_partials(xq, x_scale, self.weight, self.weight_scale, split)

    def reference(self, x: Tensor) -> Tensor:
        """Plain torch: the same activation quantisation, then float32 matmul. [T, in] -> bf16."""
        xq, x_scale = quantize_activation_reference(x, self.group)
        x_deq = dequantize_activation(xq, x_scale)
        return (x_deq @ self.dequantized_weight().T).to(torch.bfloat16)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _has_tma(device: torch.device) -> bool:
    """Hopper or newer: the Triton GEMM fetches its tiles with the tensor memory accelerator."""
    return torch.cuda.get_device_capability(device) >= (9, 0)


def fuse_outputs(*pairs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Stack block-FP8 (weight, weight_scale_inv) pairs of one input along the output dim.

    q_proj, k_proj and v_proj read the same normed hidden state: one [2560, 7168] GEMM reads
    the weights once and quantises the activations once. Each output dim must be a multiple of
    the 128-row block so that no block straddles two weights.
    """
    for weight, _ in pairs:
        if weight.shape[0] % DEFAULT_BLOCK[0]:
            raise ValueError(f"fused weights need out dims % 128 == 0, got {list(weight.shape)}")
    return torch.cat([w for w, _ in pairs]), torch.cat([s for _, s in pairs])


def pick_scaling(device: torch.device | str) -> Scaling:
    """The finest scaling `torch._scaled_mm` runs correctly on `device` (one tiny probe GEMM)."""
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return "reference"
    x = torch.ones(16, 512, device=device)
    xq, x_scale = quantize_activation_reference(x, GROUP)
    probe = Fp8Linear(
        torch.ones(128, 512, device=device).to(FP8_DTYPE),
        torch.full((1, 4), 0.5, device=device),
        "blockwise",
    )
    try:
        ok = bool((probe.matmul(xq, x_scale) == 256).all())  # 512 ones x 0.5
    except RuntimeError:  # "DeepSeek style (1x128, 128x128) scaling requires cublasLt >= 12.9"
        ok = False
    return "blockwise" if ok else "rowwise"
