"""What one engine step produced for one request: the engine's only output type.

A delta, as vLLM v1's `EngineCoreOutput`: the tokens sampled since the request's previous
output and their logprobs, never the whole sequence so far, so a step costs the same at the
first token as at the thousandth. The engine makes it (`Engine.step()`), the driver and the
gRPC servicer pass it on, the wire (wire/attention.py) carries it and the clients decode it
back to this type.

It holds no text: clients detokenise and apply stop strings (text_stream.py). An output that
finished with "stop" ended on a stop token (EOS or one of `stop_token_ids`), its last token,
whose text a client does not show.

Plain Python (the gateway imports it).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.logprobs import TokenLogprob


@dataclass(frozen=True, slots=True)
class EngineOutput:
    request_id: str
    new_token_ids: tuple[int, ...]  # sampled since this request's previous output
    new_logprobs: tuple[TokenLogprob, ...]  # one per new token when asked for, else none
    finished: bool
    finish_reason: str | None  # once finished: "stop", "length" or "abort"
    stop_reason: int | None  # the stop token id that ended it (None for EOS)
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens found in the prefix cache
    # One per prompt token after the first, when asked for (prompt_logprobs), in the output
    # that carries the first generated token only.
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
