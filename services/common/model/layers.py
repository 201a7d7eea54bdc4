"""Building blocks of the Step-3 decoder: RMSNorm, rotate-half RoPE and the SwiGLU MLP.

Plain torch on any device and dtype. Norms and RoPE compute in float32 and cast back, as the
released checkpoints were trained with. On a CUDA GPU with Triton, in bf16, fp16 or fp32, the
norm and RoPE run as one Triton kernel each (`kernels/norm_rope.py`) with the same math; the
plain-torch `rms_norm_reference` and `apply_rope_reference` are the CPU path and the oracle.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from services.common.kernels import norm_rope


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dim. weight: [dim]."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """x [..., dim] -> [..., dim] in x's dtype."""
        if norm_rope.supports(x, self.weight) and x.shape[-1] <= norm_rope.MAX_NORM_DIM:
            return norm_rope.with_reference_grad(
                partial(norm_rope.rms_norm, eps=self.eps),
                partial(rms_norm_reference, eps=self.eps),
                x,
                self.weight,
            )
        return rms_norm_reference(x, self.weight, self.eps)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm in plain torch: float32 math (float64 stays float64), cast back to x's dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight.float()).to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin for rotate-half RoPE over the full head dim: each [T, head_dim], float32."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = theta ** (-exponents / head_dim)  # [D/2]
    angles = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    angles = torch.cat((angles, angles), dim=-1)  # [T, D]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x: [T, heads, D] by cos/sin: [T, D] (neox / rotate-half layout)."""
    if (
        norm_rope.supports(x, cos, sin)
        and x.dim() == 3
        and x.shape[-1] % 2 == 0
        and cos.shape == sin.shape == (x.shape[0], x.shape[-1])
    ):
        return norm_rope.with_reference_grad(norm_rope.rope, apply_rope_reference, x, cos, sin)
    return apply_rope_reference(x, cos, sin)


def apply_rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`apply_rope` in plain torch: float32 math, cast back to x's dtype."""
    x32 = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    out = x32 * cos[:, None, :] + rotated * sin[:, None, :]
    return out.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense MLP and the shared expert.

    The three projections are built by the caller (`build.py`): wide `nn.Linear`s or
    `Fp8Linear`s over the checkpoint's block-FP8 weights, whole or a shard's columns.
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
