"""A request's whole result, gathered from its text deltas: `Completion`, and `Completions`,
which runs the text streams of many requests whose engine outputs come interleaved.

What `Engine.generate` returns and what the gateway's whole (not streamed) answers are built
from. Plain Python (the gateway imports it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.common.detokenizer import Decoder
from services.common.engine_output import EngineOutput
from services.common.logprobs import TokenLogprob
from services.common.sampling_params import SamplingParams
from services.common.text_stream import TextDelta, TextStream


@dataclass
class Completion:
    """What one request has produced so far; all of it once `finished`."""

    request_id: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # every generated token
    text: str = ""  # without a matched stop string or the stop token's text
    finish_reason: str | None = None  # "stop", "length" or "abort" once finished
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked for
    # One per prompt token after the first, when asked for (prompt_logprobs).
    prompt_logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, delta: TextDelta) -> None:
        output = delta.output
        self.token_ids += output.new_token_ids
        self.text += delta.text
        if output.new_logprobs:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs += output.new_logprobs
        if output.prompt_logprobs:
            self.prompt_logprobs = list(output.prompt_logprobs)
        self.num_cached_tokens = output.num_cached_tokens or self.num_cached_tokens
        if delta.finished:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


class Completions:
    """Many requests' completions, from their engine outputs in any interleaving."""

    def __init__(self, decoder: Decoder | None = None) -> None:
        """`decoder`: the model's tokenizer; None gives no text (and refuses stop strings)."""
        self._decoder = decoder
        self._open: dict[str, tuple[TextStream, Completion]] = {}

    def add_request(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        stream = TextStream(self._decoder, prompt_token_ids, params)
        completion = Completion(request_id, list(prompt_token_ids))
        # Asked for, they are lists even while empty (a one-token prompt has no scores).
        if params.logprobs is not None:
            completion.logprobs = []
        if params.prompt_logprobs is not None:
            completion.prompt_logprobs = []
        self._open[request_id] = (stream, completion)

    def add(self, output: EngineOutput) -> TextDelta:
        """Add one output; a delta that is finished while its output is not matched a stop
        string, and its request should be aborted in the engine."""
        stream, completion = self._open[output.request_id]
        delta = stream.add(output)
        completion.add(delta)
        return delta

    def __getitem__(self, request_id: str) -> Completion:
        return self._open[request_id][1]
