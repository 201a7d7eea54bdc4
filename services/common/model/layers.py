"""Building blocks of the Step-3 decoder: RMSNorm, rotate-half RoPE and the SwiGLU MLP.

Plain torch on any device and dtype. Norms and RoPE compute in float32 and cast back, as the
released checkpoints were trained with. `RMSNorm` runs the plain-torch reference
(`kernels/norm_rope.py`) until the model is built on a GPU, where `model/kernel_choice.py`
gives it the Triton kernel with the same math.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from services.common.kernels.norm_rope import rms_norm_reference


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dim. weight: [dim]."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.impl = rms_norm_reference  # the Triton kernel once built on a GPU (kernel_choice)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., dim] -> [..., dim] in x's dtype."""
        return self.impl(x, self.weight, self.eps)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin for rotate-half RoPE over the full head dim: each [T, head_dim], float32."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = theta ** (-exponents / head_dim)  # [D/2]
    angles = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    angles = torch.cat((angles, angles), dim=-1)  # [T, D]
    return angles.cos(), angles.sin()


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
