"""Splitting one step's chunks into micro-batches for the AFD pipeline.

Micro-batches are contiguous runs of chunks (so sampled rows keep chunk order) with token
counts as even as whole chunks allow; some may be empty when there are few sequences.
"""

from __future__ import annotations

from services.attention.scheduler import ScheduledChunk


def split_micro_batches(
    chunks: list[ScheduledChunk], num_micro_batches: int
) -> list[list[ScheduledChunk]]:
    total = sum(c.num_tokens for c in chunks)
    groups: list[list[ScheduledChunk]] = [[] for _ in range(num_micro_batches)]
    done = 0
    group = 0
    for chunk in chunks:
        # Move on once this group holds its share of the tokens (the i-th cut sits at
        # i * total / K); the last group takes whatever is left.
        while group < num_micro_batches - 1 and done * num_micro_batches >= (group + 1) * total:
            group += 1
        groups[group].append(chunk)
        done += chunk.num_tokens
    return groups
