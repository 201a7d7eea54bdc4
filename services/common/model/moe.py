"""Step-3's mixture of experts: softmax top-k routing and stacked routed experts.

Routing (the attention half's `Router`) and expert compute (the FFN half's `RoutedExperts`)
are separate functions so each side of AFD runs only its half. Expert compute has two forms
with one meaning: a loop over experts (any dtype and device; the exact one) and, for 16-bit
weights on a GPU, grouped GEMMs over all experts at once (`torch._grouped_mm`) with no host
synchronisation; `expert_forward_on` picks one for where the weights are, once, when the
FFN half is built (`kernel_choice.py`). The shared expert is a plain `SwiGLU` of the FFN
half, matching the checkpoint's `share_expert.*` names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor
from torch.nn import functional as F

from services.common.kernels.experts import REFERENCE, ExpertOps, ops_for


def route(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """Softmax over experts, then top-k.

    router_logits: [T, E] -> (weights [T, K] float32 or float64, expert ids [T, K] int64).
    Step-3 does not renormalise the k weights (`norm_expert_weight` false).
    """
    acc = torch.promote_types(router_logits.dtype, torch.float32)
    probs = torch.softmax(router_logits.to(acc), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


GROUPED_DTYPES = (torch.bfloat16,)  # what torch._grouped_mm takes on a GPU


ExpertForward = Callable[..., Tensor]  # (x, weights, ids, gate, up, down, first_expert=0)


def expert_forward_on(device: torch.device, dtype: torch.dtype) -> ExpertForward:
    """The expert computation for weights of `dtype` on `device`, chosen once when the experts
    are built: grouped GEMMs (their combine in Triton where the kernels run) for bf16
    weights on a GPU, else the loop over experts.

    Either computes sum_k weights[t, k] * expert_{ids[t, k]}(x[t]), grouped by expert, from
    x: [T, H]; weights, ids: [T, K]; gate_proj, up_proj: [E_local, F, H]; down_proj:
    [E_local, H, F] holding experts first_expert .. first_expert + E_local - 1. Assignments to
    experts outside that range contribute nothing, so an FFN shard returns its partial sum.
    Returns [T, H] in x's dtype.
    """
    if device.type == "cuda" and dtype in GROUPED_DTYPES:
        return partial(grouped_expert_forward, ops=ops_for(device))
    return looped_expert_forward


def grouped_expert_forward(
    x: Tensor,
    weights: Tensor,
    ids: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
    first_expert: int = 0,
    ops: ExpertOps = REFERENCE,
) -> Tensor:
    """The experts as three grouped GEMMs over every local expert, without a host sync; the
    combine from `ops` (Triton or plain torch, `kernels/experts.py`)."""
    groups = ExpertGroups.of(ids, gate_proj.shape[0], first_expert)
    h = x[groups.tokens].to(gate_proj.dtype)  # [T*K, H], grouped by expert
    gate = torch._grouped_mm(h, gate_proj.transpose(-2, -1), offs=groups.offsets)
    up = torch._grouped_mm(h, up_proj.transpose(-2, -1), offs=groups.offsets)
    y = torch._grouped_mm(F.silu(gate) * up, down_proj.transpose(-2, -1), offs=groups.offsets)
    return ops.combine(y, weights, groups, x.dtype)


@dataclass(frozen=True)
class ExpertGroups:
    """A step's expert assignments sorted by local expert, as grouped GEMMs take them.

    Assignments to other shards' experts sort last, past the final group offset, where the
    GEMMs leave their rows undefined; `combine` masks them out. Nothing is read back to the
    host, so a step using this can be captured in a CUDA graph.
    """

    order: Tensor  # [T*K] assignment indices (t * K + k), grouped by expert
    tokens: Tensor  # [T*K] the token of each, in that order
    offsets: Tensor  # [E_local] int32: each group's end row
    valid: Tensor  # [T*K] bool, in that order: the expert is local

    @classmethod
    def of(cls, ids: Tensor, num_experts: int, first_expert: int) -> ExpertGroups:
        local = ids.flatten() - first_expert  # [T*K]
        valid = (local >= 0) & (local < num_experts)
        local = torch.where(valid, local, num_experts)  # other shards': one group past the end
        order = torch.argsort(local, stable=True)
        # Not bincount: it reads the largest id back to the host, which a CUDA graph cannot.
        counts = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device)
        counts = counts.index_add_(0, local, torch.ones_like(local))[:num_experts]
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        return cls(order, order // ids.shape[1], offsets, valid[order])


def looped_expert_forward(
    x: Tensor,
    weights: Tensor,
    ids: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
    first_expert: int = 0,
) -> Tensor:
    """The experts one at a time: any dtype and device, exact to its precision."""
    num_tokens, top_k = ids.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    out = torch.zeros(num_tokens, x.shape[-1], dtype=acc, device=x.device)
    local = ids.flatten() - first_expert  # [T*K]
    in_shard = (local >= 0) & (local < gate_proj.shape[0])
    slots = torch.nonzero(in_shard).squeeze(1)  # assignment indices, each t * K + k
    order = slots[torch.argsort(local[slots], stable=True)]  # grouped by expert
    counts = torch.bincount(local[order], minlength=gate_proj.shape[0]).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        assignments = order[start : start + count]  # [n]
        start += count
        tokens = assignments // top_k  # [n]
        h = x[tokens]  # [n, H]
        act = F.silu(h @ gate_proj[expert].T) * (h @ up_proj[expert].T)  # [n, F]
        y = act @ down_proj[expert].T  # [n, H]
        out.index_add_(0, tokens, y.to(acc) * weights.flatten()[assignments, None].to(acc))
    return out.to(x.dtype)


def expert_forward_per_token(
    x: Tensor, weights: Tensor, ids: Tensor, gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor
) -> Tensor:
    """The same sum as `expert_forward_on`'s, one token and one expert at a time: its oracle."""
    acc = torch.promote_types(x.dtype, torch.float32)
    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            act = F.silu(gate_proj[e] @ x[t]) * (up_proj[e] @ x[t])
            out[t] += weights[t, k].to(acc) * (down_proj[e] @ act).to(acc)
    return out.to(x.dtype)
