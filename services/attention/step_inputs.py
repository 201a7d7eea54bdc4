"""Turns scheduled chunks into model inputs: the flat token batch and how it attends over the
paged KV cache. Knows nothing of the model, sampling parameters or stopping rules."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from services.attention.kv_cache import DecodeBatch, KVCache, PagedAttention, SequenceSpan
from services.attention.scheduler import ScheduledChunk


@dataclass(frozen=True)
class StepInputs:
    """The flat token batch of some chunks and how to attend over the cache for it."""

    token_ids: Tensor  # [T]
    positions: Tensor  # [T]
    backend: PagedAttention
    sample_rows: Tensor  # [S] rows whose logits pick a token, in chunk order
    # [P] rows whose logits score the next prompt token (prompt_rows: what they score)
    prompt_rows: Tensor

    @property
    def num_tokens(self) -> int:
        return self.token_ids.numel()


def prepare_inputs(chunks: list[ScheduledChunk], cache: KVCache, scale: float) -> StepInputs:
    device = cache.k.device
    token_ids: list[int] = []
    positions: list[Tensor] = []
    new_slots: list[Tensor] = []
    context_slots: list[Tensor] = []  # of the chunks plain attention takes, [end] each
    span_rows: list[tuple[int, int]] = []  # their (first row, queries)
    sample_rows: list[int] = []
    prompt_rows: list[int] = []
    decode_rows: list[int] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    for chunk in chunks:
        seq, end = chunk.seq, chunk.start + chunk.num_tokens
        if cache.decode_kernel and chunk.num_tokens == 1:
            decode_rows.append(len(token_ids))
            decode_tables.append(seq.block_table[: -(-end // cache.block_size)])
            decode_lens.append(end)
            new_slots.append(cache.slots(seq.block_table, chunk.start, end))
        else:
            context_slots.append(cache.slots(seq.block_table, 0, end))
            span_rows.append((len(token_ids), chunk.num_tokens))
            new_slots.append(context_slots[-1][chunk.start :])
        positions.append(torch.arange(chunk.start, end))
        first = len(token_ids)
        prompt_rows.extend(first + i for i in range(len(prompt_row_positions(chunk))))
        token_ids.extend(seq.token_ids[chunk.start : end])
        if chunk.samples:
            sample_rows.append(len(token_ids) - 1)
    decode = (
        DecodeBatch.build(cache, decode_rows, decode_tables, decode_lens) if decode_rows else None
    )
    # One host-to-device copy for every slot of the step: each copy from pageable memory
    # waits for the GPU, so one per sequence would cost a wait per sequence.
    slots = torch.cat(new_slots + context_slots).to(device)
    num_new = sum(s.numel() for s in new_slots)
    spans, start = [], num_new
    for (row, queries), context in zip(span_rows, context_slots, strict=True):
        spans.append(SequenceSpan(row, queries, slots[start : start + context.numel()]))
        start += context.numel()
    return StepInputs(
        token_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
        positions=torch.cat(positions).to(device),
        backend=PagedAttention(cache, slots[:num_new], spans, scale, decode),
        sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=device),
        prompt_rows=torch.tensor(prompt_rows, dtype=torch.long, device=device),
    )


def prompt_row_positions(chunk: ScheduledChunk) -> range:
    """The positions of `chunk` whose logits score a prompt token (the one after each),
    when its request asks for prompt logprobs; the prompt's last position picks the first
    output token instead."""
    seq = chunk.seq
    if seq.params.prompt_logprobs is None:
        return range(0)
    return range(chunk.start, min(chunk.start + chunk.num_tokens, len(seq.prompt_token_ids) - 1))
