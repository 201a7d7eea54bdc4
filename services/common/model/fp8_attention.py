"""MFA attention for block-FP8 weights on a GPU: the decode layer in fewer, fused launches.

The same function as `MFAAttention.residual_forward` with FP8 linears, arranged for the GPU:

    xq = rms_norm_quantize(x)                 input_layernorm + 1 x 128 e4m3, one kernel
    q_low | k | v = qkv(xq)                   q_proj | k_proj | v_proj as one GEMM (read h once)
    q = wq(rms_norm_quantize(q_low))          inter_norm + quantisation, one kernel (with the
                                              split-K GEMM's partial sums where it ran)
    q, k = rope(q), rope(k)                   one kernel for both
    a = backend(q, k, v)                      writes K/V, attends
    x + o_proj(quantize(a))                   the residual added in the GEMM's last kernel

Each GEMM picks cuBLASLt or the split-K Triton kernel by `Fp8Linear`'s measured rule. The
q_proj, k_proj and v_proj modules stay (the checkpoint's names, for state dicts and tests); their
weights become views into the fused one, so no byte is held twice.

What this module does not know: where K/V live (the backend's business) or when to use it
(`build.py` swaps it in for layers whose five linears are blockwise FP8 on CUDA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from services.common import kernels
from services.common.kernels import norm_rope
from services.common.kernels.fp8_norm import MAX_DIM, rms_norm_quantize, sum_rms_norm_quantize
from services.common.model.attention import AttentionBackend, MFAAttention
from services.common.model.fp8_linear import Fp8Linear, fuse_outputs
from services.common.model.layers import RMSNorm

LINEARS = ("q_proj", "k_proj", "v_proj", "wq", "o_proj")


def can_fuse(attn: MFAAttention) -> bool:
    """Whether `attn` has every linear in blockwise FP8 where the kernels run, q|k|v stackable
    (output dims whole 128-row blocks) and norms the fused kernel can hold in registers."""
    linears = [getattr(attn, name) for name in LINEARS]
    return (
        kernels.available(attn.q_proj.weight.device)
        and all(
            isinstance(lin, Fp8Linear) and lin.scaling == "blockwise" and lin.weight.is_cuda
            for lin in linears
        )
        and all(lin.out_features % 128 == 0 for lin in linears[:3])
        and attn.q_proj.in_features <= MAX_DIM
        and attn.q_proj.out_features <= MAX_DIM
    )


class Fp8MFAAttention(MFAAttention):
    """An `MFAAttention` whose five linears are blockwise `Fp8Linear`s, run fused."""

    @classmethod
    def from_module(cls, attn: MFAAttention) -> Fp8MFAAttention:
        """Take over `attn`'s modules (no copy but the fused q|k|v weight, whose parts the
        three projections then view)."""
        if not can_fuse(attn):
            raise ValueError("every linear must be a blockwise Fp8Linear on CUDA")
        layer = cls.__new__(cls)
        layer.__dict__.update(attn.__dict__)  # modules, buffers, hyperparameters
        parts = [getattr(attn, name) for name in LINEARS[:3]]
        weight, scale = fuse_outputs(*((p.weight, p.weight_scale) for p in parts))
        # A plain attribute, not a submodule: the state dict keeps the checkpoint's names.
        layer.__dict__["qkv"] = Fp8Linear(weight, scale, "blockwise")
        row, block_row = 0, 0
        for part in parts:
            rows = part.out_features
            part.weight = weight[row : row + rows]
            part.weight_scale = scale[block_row : block_row + -(-rows // 128)]
            row, block_row = row + rows, block_row + -(-rows // 128)
        return layer

    def residual_forward(
        self, x: Tensor, norm: RMSNorm, cos: Tensor, sin: Tensor, backend: AttentionBackend
    ) -> Tensor:
        """x [T, H] bf16 (the residual stream, not normed) -> x + attn(norm(x)) [T, H]."""
        return self.branch(x, norm, cos, sin, backend, residual=x)

    def branch(
        self,
        x: Tensor,
        norm: RMSNorm,
        cos: Tensor,
        sin: Tensor,
        backend: AttentionBackend,
        residual: Tensor | None = None,
    ) -> Tensor:
        """attn(norm(x)) [T, H] bf16, plus `residual` [T, H] if given (added in o_proj's last
        kernel where it can be)."""
        t, d = x.shape[0], self.head_dim
        qkv, wq, o_proj, inter = self.qkv, self.wq, self.o_proj, self.inter_norm
        x_in = rms_norm_quantize(x, norm.weight, norm.eps, qkv.token_multiple)
        q_dim, kv_dim = self.q_proj.out_features, self.num_kv_heads * d
        split = qkv.split_k(t, x.device)
        if split and qkv.out_features <= MAX_DIM:  # partial sums, inter_norm, quantisation: one
            partials = qkv.partials(x_in[0][:t], x_in[1][:t], split)
            h, *q_in = sum_rms_norm_quantize(
                partials, q_dim, inter.weight, inter.eps, wq.token_multiple
            )
        else:
            h = qkv.matmul(*x_in)[:t]
            q_in = rms_norm_quantize(h[:, :q_dim], inter.weight, inter.eps, wq.token_multiple)
        _, k, v = h.split((q_dim, kv_dim, kv_dim), dim=-1)
        q = wq.matmul(*q_in)[:t].view(t, self.num_heads, d)  # [T, Hq, D]
        k = k.view(t, self.num_kv_heads, d)  # [T, G, D]; views of the fused output
        q, k = norm_rope.rope_qk(q, k, cos, sin)  # one launch for both
        out = backend(self.layer, q, k, v.view(t, self.num_kv_heads, d))  # [T, Hq, D]
        a = o_proj.quantize_input(out.reshape(t, self.num_heads * d))
        if residual is None:
            return o_proj.matmul(*a)[:t]
        if residual.dtype != torch.bfloat16:  # the fused add writes bf16, the stream's dtype
            return residual + o_proj.matmul(*a)[:t]
        return o_proj.matmul(*a, residual=residual)


def fuse_attention(model: torch.nn.Module) -> int:
    """Swap every fusable `MFAAttention` in `model` for an `Fp8MFAAttention`; how many."""
    names = [
        name
        for name, module in model.named_modules()
        if type(module) is MFAAttention and can_fuse(module)
    ]
    for name in names:
        model.set_submodule(name, Fp8MFAAttention.from_module(model.get_submodule(name)))
    return len(names)
