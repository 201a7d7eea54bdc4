"""The Step-3 text model: the attention half and the whole FFN half, side by side.

    x, cos, sin = embed(ids, positions)
    per layer:  x, ffn_input = attention_layer(x);  x = x + ffn(ffn_input)
    logits = lm_head(norm(x))

This is the model cut once, where AFD cuts it (`attention_half.py`, `ffn_half.py`): the
reference model and `afd generate` run it as is, the engine's runner runs the same two
halves with the FFN in this process or on FFN instances.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from services.common.model.attention import AttentionBackend
from services.common.model.attention_half import AttentionHalf
from services.common.model.ffn_half import FFNHalf


class Step3ForCausalLM(nn.Module):
    """token ids -> final hidden states -> logits. Attention storage comes from the caller."""

    def __init__(self, attention: AttentionHalf, ffn: FFNHalf) -> None:
        super().__init__()
        self.cfg = attention.cfg
        self.attention = attention
        self.ffn = ffn

    @property
    def device(self) -> torch.device:
        return self.attention.device

    @property
    def dtype(self) -> torch.dtype:
        return self.attention.dtype

    def forward(self, token_ids: Tensor, positions: Tensor, backend: AttentionBackend) -> Tensor:
        """token_ids, positions: [T] int64 (any mix of sequences) -> residual stream [T, H]."""
        x, cos, sin = self.attention.embed(token_ids, positions)
        for index, layer in enumerate(self.attention.layers):
            x, ffn_input = layer(x, cos, sin, backend)
            x = x + self.ffn(index, ffn_input)
        return x

    def compute_logits(self, x: Tensor) -> Tensor:
        """x: [N, H] residual stream -> logits [N, V] in the model's dtype."""
        return self.attention.logits(x)
