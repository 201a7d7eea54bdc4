"""What a request has produced so far, and the text-level stopping rule (stop strings).

Generated text excludes a matched stop string, as the OpenAI API defines it. While a
request runs, the last few characters that could still begin a stop string are held back, so
streamed text never has to be taken back.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.detokenizer import Decoder, IncrementalDetokenizer
from services.common.logprobs import TokenLogprob


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every generated token so far
    text: str  # the generated text that is final so far
    new_token_ids: list[int]  # generated since the previous output of this request
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort"
    stop_reason: int | str | None  # the stop token id or stop string that ended it
    num_cached_tokens: int  # prompt tokens found in the prefix cache
    logprobs: list[TokenLogprob] | None  # one per generated token, when asked for
    # One per prompt token after the first, once the prompt is computed, when asked for
    # (prompt_logprobs); None otherwise.
    prompt_logprobs: list[TokenLogprob] | None = None


class TextTracker:
    """One request's generated text, piece by piece, and its stop-string check."""

    def __init__(
        self,
        tokenizer: Decoder | None,
        prompt_ids: list[int],
        stop: tuple[str, ...],
        skip_special_tokens: bool,
    ) -> None:
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer to read the generated text")
        self._detokenizer = (
            IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
            if tokenizer
            else None
        )
        self._stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self._num_released = 0

    def add(self, token_id: int) -> str | None:
        """Append the token's text; return the stop string it completed, if any."""
        if self._detokenizer is None:
            return None
        piece = self._detokenizer.add(token_id)
        if not self._stop or not piece:
            self.text += piece
            return None
        search_from = max(0, len(self.text) - self._holdback)
        self.text += piece
        hits = [(i, s) for s in self._stop if (i := self.text.find(s, search_from)) >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        self.text = self.text[:index]
        return stop

    def finish(self, matched_stop: bool) -> None:
        if self._detokenizer is not None and not matched_stop:
            self.text += self._detokenizer.flush()
        self._holdback = 0

    def release(self) -> str:
        """Text that became final since the last call."""
        final = len(self.text) - self._holdback
        if final <= self._num_released:
            return ""
        piece = self.text[self._num_released : final]
        self._num_released = final
        return piece

    @property
    def released_text(self) -> str:
        return self.text[: self._num_released]
