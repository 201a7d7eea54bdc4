"""How one request wants its tokens chosen and when it wants generation to stop.

Plain Python (the gateway builds these without torch). Invalid values raise `ValueError`
naming the parameter, so every front end reports the same message.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_TEMPERATURE = 1e-5  # lower temperatures sample greedily


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    seed: int | None = None  # same seed, same tokens, whatever else is in the batch
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: also the top n
    # The same for each prompt token after the first (what the model would have given it);
    # such a request computes its whole prompt, prefix cache or not.
    prompt_logprobs: int | None = None
    # OpenAI's penalties on tokens already generated (not the prompt): each token's logit
    # drops by presence_penalty once it has appeared and by frequency_penalty per appearance.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # OpenAI's logit_bias: (token id, bias) pairs, each bias added to that token's logit
    # before sampling; -100 bans a token, 100 all but forces it.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Structured output: an llguidance grammar (Lark, or its JSON form) the output must
    # follow; each step's tokens are masked to those it allows (attention/grammar.py).
    grammar: str | None = None

    MAX_LOGPROBS = 20
    MAX_PENALTY = 2.0
    MAX_BIAS = 100.0

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise ValueError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must hold non-empty strings, got {self.stop!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids, got {self.stop_token_ids!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not -self.MAX_PENALTY <= value <= self.MAX_PENALTY
            ):
                raise ValueError(
                    f"{name} must be a number in [-{self.MAX_PENALTY}, {self.MAX_PENALTY}], "
                    f"got {value!r}"
                )
        for pair in self.logit_bias:
            token, bias = pair if isinstance(pair, tuple) and len(pair) == 2 else (None, None)
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias must map token ids to biases, got {pair!r}")
            if (
                isinstance(bias, bool)
                or not isinstance(bias, int | float)
                or not -self.MAX_BIAS <= bias <= self.MAX_BIAS
            ):
                raise ValueError(
                    f"logit_bias of token {token} must be a number in [-{self.MAX_BIAS:g}, "
                    f"{self.MAX_BIAS:g}], got {bias!r}"
                )
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar):
            raise ValueError(f"grammar must be a non-empty string, got {self.grammar!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 0 <= value <= self.MAX_LOGPROBS
            ):
                raise ValueError(
                    f"{name} must be an integer in [0, {self.MAX_LOGPROBS}], got {value!r}"
                )

    @property
    def greedy(self) -> bool:
        # Below MIN_TEMPERATURE, logits / temperature overflow to infinities whose softmax is
        # NaN; the limit of such a distribution is the argmax anyway.
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
