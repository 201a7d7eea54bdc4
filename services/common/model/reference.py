"""The oracle: the whole model with no KV cache, every token recomputed from scratch.

Slow on purpose and with nothing to get wrong: no paging, no batching, no chunking. Every
faster path (the engine, the disaggregated runtime, GPU kernels) is tested against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from services.common.model.attention import causal_attention
from services.common.model.step3 import Step3ForCausalLM


class ContiguousAttention:
    """Causal attention over the keys of this one call: one sequence from position 0."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return causal_attention(q, k, v, self.scale, q_offset=0)


@torch.inference_mode()
def reference_logits(
    model: Step3ForCausalLM, token_ids: list[int], last_only: bool = False
) -> Tensor:
    """Logits [T, V] at every position of one sequence ([1, V] for the last with last_only)."""
    device = model.device
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    positions = torch.arange(len(token_ids), device=device)
    hidden = model(ids, positions, ContiguousAttention(model.cfg.head_dim**-0.5))  # [T, H]
    return model.compute_logits(hidden[-1:] if last_only else hidden)


def reference_greedy(
    model: Step3ForCausalLM, prompt: list[int], max_tokens: int, stop_ids: tuple[int, ...] = ()
) -> list[int]:
    """Greedy continuation of `prompt`, recomputing the whole sequence for every token."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        next_id = int(reference_logits(model, tokens, last_only=True)[-1].argmax())
        tokens.append(next_id)
        if next_id in stop_ids:
            break
    return tokens[len(prompt) :]
