"""Turns a scheduled step into tensors, runs the model over its paged KV cache, returns the
logits of the rows that sample. Owns the model and the cache; knows nothing of requests'
sampling parameters or stopping rules."""

from __future__ import annotations

import torch
from torch import Tensor

from services.attention.kv_cache import KVCache, PagedAttention, SequenceSpan
from services.attention.scheduler import ScheduledChunk
from services.common.model.step3 import Step3ForCausalLM


class ModelRunner:
    def __init__(self, model: Step3ForCausalLM, cache: KVCache) -> None:
        self.model = model
        self.model_config = model.cfg
        self.cache = cache
        self.device = model.lm_head.weight.device
        self.scale = model.cfg.head_dim**-0.5

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> Tensor:
        """Compute every chunk; logits [num sampling chunks, V] in chunk order."""
        if not chunks:
            return torch.empty(0, self.model_config.vocab_size, device=self.device)
        token_ids: list[int] = []
        spans: list[SequenceSpan] = []
        new_slots: list[Tensor] = []
        sample_rows: list[int] = []
        for chunk in chunks:
            seq, end = chunk.seq, chunk.start + chunk.num_tokens
            spans.append(
                SequenceSpan(
                    len(token_ids), chunk.num_tokens, self.cache.slots(seq.block_table, 0, end)
                )
            )
            new_slots.append(spans[-1].context_slots[chunk.start :])
            token_ids.extend(seq.token_ids[chunk.start : end])
            if chunk.samples:
                sample_rows.append(len(token_ids) - 1)
        positions = torch.cat([torch.arange(c.start, c.start + c.num_tokens) for c in chunks]).to(
            self.device
        )
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        backend = PagedAttention(self.cache, torch.cat(new_slots), spans, self.scale)
        hidden = self.model(ids, positions, backend)  # [T, H]
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden[rows])
