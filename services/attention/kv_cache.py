"""The paged KV cache's storage and the attention that reads it.

K and V of every layer live in flat slot arrays: slot = block * block_size + offset, the
block ids coming from the block manager. One step's `PagedAttention` writes the new tokens'
K/V into their slots, then lets each sequence's queries attend over its own slots. On a GPU
the decode rows (one query each) go to the MFA decode kernel in one call, which reads each
sequence's single K/V stream once for all its query heads, and prefill chunks go to PyTorch's
fused SDPA; on CPU every row takes plain torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from services.common import kernels
from services.common.config import ModelConfig
from services.common.kernels import kv_write, mfa_decode
from services.common.kernels.fp8 import FP8_DTYPE
from services.common.model.attention import causal_attention, causal_attention_sdpa


class KVCache:
    """k, v: [layers, (num_blocks + 1) * block_size, G, D] (G = K/V heads, one for Step-3).

    Blocks 0 .. num_blocks - 1 are the block manager's. The one after them is scratch: the
    padding rows of a decode step replayed from a CUDA graph write their K/V there and read
    it back, so they never touch a sequence's cache.

    The cache holds the model's dtype, or e4m3 FP8 (`kv_dtype`): half the bytes of bf16, so
    twice the tokens in the same memory and half the bytes each decode step reads. FP8 values
    are stored divided by a per-tensor scale (`k_scale`, `v_scale`; 1.0, as vLLM takes them
    when a checkpoint carries none) and clamped to e4m3's range; reads multiply it back.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        shape = (
            cfg.num_hidden_layers,
            (num_blocks + 1) * block_size,
            cfg.num_attention_groups,
            cfg.head_dim,
        )
        self.block_size = block_size
        self.scratch_block = num_blocks
        # Chosen once, here: on a GPU the Triton write (one launch for K and V instead of two
        # to eight) and, for the shapes it takes, the decode kernel; plain torch elsewhere.
        triton = kernels.available(device)
        self.write_kv = kv_write.write_kv if triton else kv_write.write_kv_reference
        self.decode_kernel = triton and mfa_decode.handles(
            cfg.num_attention_heads, cfg.head_dim, cfg.num_attention_groups, block_size, dtype
        )
        storage = kv_dtype or dtype
        self.fp8 = storage == FP8_DTYPE
        self.k_scale = self.v_scale = 1.0
        self.k = torch.zeros(shape, dtype=storage, device=device)
        self.v = torch.zeros(shape, dtype=storage, device=device)

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block, K and V of every layer, stored in `dtype`."""
        per_token = 2 * cfg.num_hidden_layers * cfg.num_attention_groups * cfg.head_dim
        return per_token * block_size * dtype.itemsize

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k, v [n, G, D] of `layer` at `slots` [n] (e4m3 caches: divided by the scales)."""
        self.write_kv(self.k[layer], self.v[layer], slots, k, v, self.k_scale, self.v_scale)

    def read(self, layer: int, slots: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """K, V [n, G, D] of `layer` at `slots`, in `dtype`."""
        if not self.fp8:
            return self.k[layer][slots], self.v[layer][slots]
        return (
            (self.k[layer][slots].float() * self.k_scale).to(dtype),
            (self.v[layer][slots].float() * self.v_scale).to(dtype),
        )

    def slots(self, block_table: list[int], start: int, end: int) -> Tensor:
        """Slot indices of token positions [start, end) of a sequence: [end - start] int64,
        on the host (a step moves all of its slots to the device at once)."""
        positions = torch.arange(start, end)
        blocks = torch.tensor(block_table, dtype=torch.long)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size


@dataclass(frozen=True)
class SequenceSpan:
    """One sequence's rows in the step's flat batch and the slots of its whole context."""

    row_start: int  # first of its query rows in the batch
    num_queries: int
    context_slots: Tensor  # [context_len] slots of positions 0 .. context_len - 1


@dataclass(frozen=True)
class DecodeBatch:
    """The step's decode rows, one query each, as the decode kernel takes them."""

    rows: Tensor  # [B] their rows in the step's flat batch
    block_tables: Tensor  # [B, blocks of the longest] int32, padded with 0
    context_lens: Tensor  # [B] int32
    num_splits: int  # context splits per sequence: the same for every layer of the step

    @classmethod
    def build(
        cls, cache: KVCache, rows: list[int], tables: list[list[int]], lens: list[int]
    ) -> DecodeBatch:
        device = cache.k.device
        width = max(len(table) for table in tables)
        padded = [table + [0] * (width - len(table)) for table in tables]
        return cls(
            torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(padded, dtype=torch.int32, device=device),
            torch.tensor(lens, dtype=torch.int32, device=device),
            mfa_decode.default_num_splits(
                len(rows), width * cache.block_size, cache.k.dtype, device
            ),
        )


class PagedAttention:
    """The `AttentionBackend` of one engine step."""

    def __init__(
        self,
        cache: KVCache,
        new_slots: Tensor,
        spans: list[SequenceSpan],
        scale: float,
        decode: DecodeBatch | None = None,
    ):
        self.cache = cache
        self.new_slots = new_slots  # [T] where this step's K/V go
        self.spans = spans  # the rows plain torch attends for
        self.scale = scale
        self.decode = decode  # the rows the decode kernel attends for

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: [T, Hq, D]; k, v: [T, G, D] -> [T, Hq, D]."""
        cache = self.cache
        cache.write(layer, self.new_slots, k, v)
        out = torch.empty_like(q)
        if self.decode is not None:
            d = self.decode
            scales = dict(k_scale=cache.k_scale, v_scale=cache.v_scale) if cache.fp8 else {}
            out[d.rows] = mfa_decode.mfa_decode(
                q[d.rows], cache.k[layer], cache.v[layer], d.block_tables, d.context_lens,
                self.scale, block_size=cache.block_size, num_splits=d.num_splits, **scales,
            )  # fmt: skip
        # On a GPU the fused SDPA kernels: a long prompt's [n, c] scores would not fit. The
        # float64 oracle runs keep the exact path.
        fused = q.is_cuda and q.dtype != torch.float64
        for span in self.spans:
            rows = slice(span.row_start, span.row_start + span.num_queries)
            k_span, v_span = cache.read(layer, span.context_slots, q.dtype)
            if fused:
                out[rows] = causal_attention_sdpa(q[rows], k_span, v_span, self.scale)
            else:
                q_offset = span.context_slots.numel() - span.num_queries
                out[rows] = causal_attention(q[rows], k_span, v_span, self.scale, q_offset)
        return out
