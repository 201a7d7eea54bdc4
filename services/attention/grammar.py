"""Structured output: a request's grammar decides which tokens it may sample next.

Each constrained request holds an llguidance matcher over its grammar (a JSON schema compiled
to Lark by the gateway, services/gateway/structured.py). Before sampling, every constrained
row's next-token mask is computed on the CPU (llguidance's executor, in parallel threads,
outside the GIL: tens of microseconds a row), copied to the logits' device and applied as
-inf to the tokens it forbids, on a copy: the logprobs stay the raw model's. Rows without a
grammar are not touched, so a constrained request never holds up the others' sampling more
than its mask costs. After sampling, each matcher consumes its row's token; once the grammar
has ended (its end-of-sequence consumed), the request stops.

The vocabulary comes from the model's tokenizer (its `tokenizers` JSON), read once, when the
first constrained request arrives (about a second for a 128K vocabulary).
"""

from __future__ import annotations

import llguidance
import numpy as np
import torch
from torch import Tensor

WORD_BITS = 32


class GrammarError(ValueError):
    """A grammar llguidance cannot use: the request is refused with its message."""


class Grammars:
    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...]):
        """`vocab_size`: the logits' width, which may differ from the tokenizer's count."""
        self._json = tokenizer_json
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._executor = llguidance.LLExecutor()

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        if self._tokenizer is None:
            self._tokenizer = llguidance.LLTokenizer(
                self._json, n_vocab=self.vocab_size, eos_token=self._eos
            )
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the request's grammar is not usable: {matcher.get_error()}")
        return matcher

    def constrain(self, logits: Tensor, rows: list[tuple[int, llguidance.LLMatcher]]) -> Tensor:
        """logits [N, V] -> a copy with each listed row's forbidden tokens at -inf."""
        words = -(-self.vocab_size // WORD_BITS)
        bitmask = np.zeros((len(rows), words), dtype=np.int32)
        matchers = [(matcher, i) for i, (_, matcher) in enumerate(rows)]
        self._executor.unsafe_compute_mask_ptr(matchers, bitmask.ctypes.data, words * 4, len(rows))
        # One pass over the logits (a fill of a fresh tensor): rows without a grammar keep
        # all their tokens.
        forbidden = np.zeros(logits.shape, dtype=bool)
        forbidden[[row for row, _ in rows]] = ~unpack(bitmask, logits.shape[-1])
        return logits.masked_fill(torch.from_numpy(forbidden).to(logits.device), float("-inf"))


def unpack(bitmask: np.ndarray, width: int) -> np.ndarray:
    """int32 words [R, W], bit j of word w allowing token 32 w + j -> bool [R, width]
    (tokens past the mask forbidden)."""
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")  # [R, 32 W]
    allowed = np.zeros((bitmask.shape[0], width), dtype=bool)
    columns = min(width, bits.shape[1])
    allowed[:, :columns] = bits[:, :columns]
    return allowed
