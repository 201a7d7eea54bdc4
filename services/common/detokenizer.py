"""Streaming detokenisation: token ids in one at a time, finished text out.

A byte-level BPE token can end in the middle of a UTF-8 character; decoding then shows U+FFFD
where the incomplete bytes are. `IncrementalDetokenizer` holds such text back until the next
tokens complete it, so no piece it returns carries a half character, and the pieces of a
stream joined together equal `decode(all_generated_ids)` exactly.

It follows vLLM's prefix_offset/read_offset scheme: each step decodes only a short window of
recent ids (a few tokens of already-emitted context plus the not yet emitted ones) and diffs it
against the context's text, so a step costs O(window), not O(length of the stream).

`FastIncrementalDetokenizer` does the same job with the `tokenizers` library's `DecodeStream`
(Rust: about half the cost per token), for a `tokenizers.Tokenizer`; where DecodeStream cannot
go on, it hands the stream over to `IncrementalDetokenizer`. `detokenizer_for` picks one.

This module deliberately knows nothing of requests, stop strings or sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from tokenizers.decoders import DecodeStream

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as context ahead of the first generated one, as vLLM does: enough for a
# decoder whose output depends on the previous token (a leading-space rule), few enough to be cheap.
NUM_CONTEXT_TOKENS = 5
# A window this many unemitted tokens long is searched for an earlier boundary to restart from;
# only a run of invalid bytes (never real text) keeps one growing this far.
MAX_PENDING_TOKENS = 8
NUM_SPLIT_CANDIDATES = 4


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class Detokenizer(Protocol):
    """One stream of generated ids in, text pieces out; the pieces join to their decode."""

    def add(self, token_id: int) -> str: ...
    def flush(self) -> str: ...


def detokenizer_for(
    decoder: Decoder, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = False
) -> Detokenizer:
    """The decoder's own streaming detokenizer where it has one (services/common/tokenizer.py's
    `Tokenizer.detokenizer`), else the plain one over its `decode`."""
    make = getattr(decoder, "detokenizer", None)
    if make is not None:
        return make(prompt_ids, skip_special_tokens)
    return IncrementalDetokenizer(decoder, prompt_ids, skip_special_tokens)


class IncrementalDetokenizer:
    """Turns one stream of generated ids into text pieces; call `add` per id, `flush` at the end.

    State: `_ids` is the window, vLLM's ids from prefix_offset on (older ids are dropped).
    `_ids[:_read_offset]` is context whose text (`_prefix_len` characters) is already out;
    `_ids[_read_offset:]` are ids not yet fully emitted, of whose text `_num_emitted` characters
    are out. `_read_offset` is always a character boundary: the bytes before it decode alone to
    what they decode to in the whole stream.
    """

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[-NUM_CONTEXT_TOKENS:])
        context_text = self._decode(context)
        # A prompt that ends inside a character would glue its bytes to the first generated
        # token; without that context the pieces still add up to decode(generated ids).
        if context_text.endswith(REPLACEMENT_CHAR):
            context, context_text = [], ""
        self._ids = context
        self._read_offset = len(context)
        self._prefix_len = len(context_text)
        self._num_emitted = 0

    def add(self, token_id: int) -> str:
        """Append one generated id; return the text it completes (often "", never half a char)."""
        self._ids.append(token_id)
        pending = self._pending_text()
        # Decoding is a left-to-right scan, so everything but a trailing U+FFFD is final: that
        # one may be bytes of a character the next token completes.
        incomplete = pending.endswith(REPLACEMENT_CHAR)
        piece = pending[self._num_emitted : len(pending) - incomplete]
        self._num_emitted += len(piece)
        if not incomplete:
            self._advance(len(self._ids))
        elif len(self._ids) - self._read_offset > MAX_PENDING_TOKENS:
            self._restart_window()
        return piece

    def flush(self) -> str:
        """End the stream: return what was held back, U+FFFD included if it ended mid-character."""
        piece = self._pending_text()[self._num_emitted :]
        self._advance(len(self._ids))
        return piece

    def _pending_text(self) -> str:
        """Text of the ids after `_read_offset`, decoded with the context ahead of them."""
        return self._decode(self._ids)[self._prefix_len :]

    def _advance(self, read_offset: int) -> None:
        """Mark the window's ids before `read_offset` (a character boundary) as emitted.

        The ids emitted last become the new context and older ones are dropped, which keeps
        the window a few tokens long.
        """
        del self._ids[: self._read_offset]
        self._read_offset = read_offset - self._read_offset
        self._prefix_len = len(self._decode(self._ids[: self._read_offset]))
        self._num_emitted = 0

    def _restart_window(self) -> None:
        """Move `_read_offset` to a later boundary when the window ends in a run of bad bytes.

        A split point is a boundary when decoding both sides apart gives the same text as
        decoding them together: a character cut in two would decode as extra U+FFFDs, and
        invalid bytes already followed by the byte that ends them decode the same either way.
        The test needs text on the right to say anything, and all text on the left must be out.
        """
        window = self._ids[self._read_offset :]
        whole = self._decode(window)
        for split in range(len(window) - 1, max(0, len(window) - NUM_SPLIT_CANDIDATES - 1), -1):
            left, right = self._decode(window[:split]), self._decode(window[split:])
            if right and left + right == whole and len(left) <= self._num_emitted:
                num_emitted = self._num_emitted - len(left)
                self._advance(self._read_offset + split)
                self._num_emitted = num_emitted
                return

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


class FastIncrementalDetokenizer:
    """`IncrementalDetokenizer` on the `tokenizers` library's `DecodeStream`.

    DecodeStream emits a piece once the decoded window no longer ends in U+FFFD. It has no end
    of stream (bytes still held back would be lost), raises when a window's text does not
    extend what it emitted (a decoder whose text for earlier tokens depends on later ones),
    and decodes a run of incomplete bytes whole at every step. In those three cases the ids
    not yet emitted go to an `IncrementalDetokenizer`, which serves the rest of the stream.
    """

    def __init__(
        self, backend: Any, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = False
    ) -> None:
        """`backend`: a `tokenizers.Tokenizer`."""
        self._backend = backend
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[-NUM_CONTEXT_TOKENS:])
        # As IncrementalDetokenizer: a prompt ending inside a character is no context.
        if backend.decode(context, skip_special_tokens=skip_special_tokens).endswith(
            REPLACEMENT_CHAR
        ):
            context = []
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self._context = context  # ids whose text is out, just before `_pending`
        self._pending: list[int] = []  # ids whose text is not out yet
        self._fallback: IncrementalDetokenizer | None = None

    def add(self, token_id: int) -> str:
        if self._fallback is not None:
            return self._fallback.add(token_id)
        self._pending.append(token_id)
        try:
            piece = self._stream.step(self._backend, token_id)
        except Exception:  # tokenizers' "Invalid prefix encountered" (a bare Exception)
            return self._hand_over()
        if piece is None:
            return self._hand_over() if len(self._pending) > MAX_PENDING_TOKENS else ""
        self._context, self._pending = self._pending, []
        return piece

    def flush(self) -> str:
        if self._fallback is None:
            if not self._pending:
                return ""
            held = self._hand_over()
        else:
            held = ""
        return held + self._fallback.flush()

    def _hand_over(self) -> str:
        """Continue the stream in Python: the pending ids are its first."""
        self._fallback = IncrementalDetokenizer(
            self._backend, self._context, self._skip_special_tokens
        )
        return "".join(self._fallback.add(token_id) for token_id in self._pending)
