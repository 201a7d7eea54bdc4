"""One request's generated text, read from its engine outputs: detokenisation and stop strings,
on the client's side of the engine as in vLLM v1's front end.

Feed a request's `EngineOutput`s in order to `TextStream.add`; each returns a `TextDelta`, the
text that became final with it. Text is never taken back: while the request runs, the last
characters that could still begin a stop string are held back. A stop string ends the text
before it (the earliest match wins) and the request with it: finish_reason "stop", the string
as stop_reason; the caller then cancels the request in the engine. A request the engine
stopped on a stop token (EOS or a stop token id) does not show that token's text, as vLLM.

Plain Python (the gateway imports it); knows nothing of HTTP, gRPC or the engine's insides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.common.detokenizer import Decoder, detokenizer_for
from services.common.engine_output import EngineOutput
from services.common.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class TextDelta:
    """One engine output as a client shows it. `finished`, `finish_reason` and `stop_reason`
    are the request's: a stop string ends it here before the engine knows."""

    output: EngineOutput  # the tokens and logprobs it carried
    text: str  # what became final with it (often "")
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None  # the stop token id or stop string that ended it


class TextStream:
    def __init__(
        self,
        decoder: Decoder | None,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
    ) -> None:
        """`decoder`: the model's tokenizer; None gives no text (token ids only)."""
        if params.stop and decoder is None:
            raise ValueError("stop strings need a tokenizer to read the generated text")
        self._detokenizer = (
            None
            if decoder is None
            else detokenizer_for(decoder, prompt_token_ids, params.skip_special_tokens)
        )
        self._stop = params.stop
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        # Text not yet handed out: the held-back characters, then the newest pieces. A stop
        # string not yet found must end in the newest pieces, so this is all that is searched.
        self._tail = ""
        self._ended: TextDelta | None = None

    def add(self, output: EngineOutput) -> TextDelta:
        if self._ended is not None:  # a stop string ended it; the engine had not heard yet
            ended = self._ended
            return TextDelta(output, "", True, ended.finish_reason, ended.stop_reason)
        if self._detokenizer is None:
            return TextDelta(output, "", output.finished, output.finish_reason, output.stop_reason)
        ids = output.new_token_ids
        if output.finish_reason == "stop":
            ids = ids[:-1]  # the stop token: generation's end, not text
        for token_id in ids:
            self._tail += self._detokenizer.add(token_id)
            if self._stop:
                matched = self._find_stop()
                if matched is not None:
                    index, stop = matched
                    text, self._tail = self._tail[:index], ""
                    self._ended = TextDelta(output, text, True, "stop", stop)
                    return self._ended
        if output.finished:
            text = self._tail + self._detokenizer.flush()
            self._tail = ""
            return TextDelta(output, text, True, output.finish_reason, output.stop_reason)
        final = max(0, len(self._tail) - self._holdback)
        text, self._tail = self._tail[:final], self._tail[final:]
        return TextDelta(output, text, False, None, None)

    def _find_stop(self) -> tuple[int, str] | None:
        """The earliest stop string in the tail: (where it starts, which)."""
        hits = [(i, s) for s in self._stop if (i := self._tail.find(s)) >= 0]
        return min(hits) if hits else None
