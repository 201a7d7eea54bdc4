"""Continuous batching: which sequences run this step, and how many of their tokens.

Every step spends a token budget. Running sequences go first (a decode costs one token, an
unfinished prompt a chunk of what is left), then waiting ones are admitted in arrival order
while the budget, the sequence cap and free KV blocks allow. Long prompts are thus chunked
and never stall running decodes. When blocks run out, the most recently admitted sequence
is preempted: its blocks are freed and it recomputes later (cached blocks may survive).

Plain Python; knows nothing of tensors or the model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from services.attention.block_manager import BlockManager
from services.attention.sequence import Sequence, SequenceStatus
from services.common.cluster_config import DEFAULT_MAX_NUM_BATCHED_TOKENS


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences running at once
    # Tokens computed per step (the chunked-prefill budget); a disaggregated instance's is the
    # cluster's (cluster_config.py).
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}"
            )


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute tokens [start, start + num_tokens) of `seq` this step."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool  # the chunk reaches the sequence's end: its last logits pick a token


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]
    num_prefix_hit_tokens: int  # tokens of newly admitted sequences found in the cache

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        num_hits = 0

        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.allocate(seq, num_tokens):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                chunks.append(self._chunk(seq, seq.num_computed_tokens, num_tokens))
                budget -= num_tokens
                index += 1
                continue
            break

        # Admitting right after a preemption would only evict someone else again.
        while not preempted and self.waiting and budget > 0:
            if len(self.running) >= self.config.max_num_seqs:
                break
            seq = self.waiting[0]
            # A request that scores its prompt computes all of it: no prefix from the cache.
            scores_prompt = seq.params.prompt_logprobs is not None
            cached = [] if scores_prompt else self.block_manager.lookup_prefix(seq.token_ids)
            num_cached = len(cached) * self.block_manager.block_size
            num_tokens = min(seq.num_tokens - num_cached, budget)
            if not self.block_manager.allocate(seq, num_tokens, cached):
                break
            self.waiting.popleft()
            seq.num_computed_tokens = seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(self._chunk(seq, num_cached, num_tokens))
            budget -= num_tokens
            num_hits += num_cached
        return SchedulerOutput(chunks, preempted, num_hits)

    def update(self, output: SchedulerOutput) -> None:
        """Record that every scheduled chunk was computed (before sampled tokens arrive)."""
        for chunk in output.chunks:
            chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens
            self.block_manager.cache_full_blocks(chunk.seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` wherever it is (running, waiting) and release its blocks."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    @staticmethod
    def _chunk(seq: Sequence, start: int, num_tokens: int) -> ScheduledChunk:
        return ScheduledChunk(seq, start, num_tokens, start + num_tokens == seq.num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
