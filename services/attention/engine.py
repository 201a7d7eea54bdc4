"""The single-process engine: continuous batching over a paged KV cache.

    step():  schedule  ->  execute  ->  update

`schedule` (plain Python) picks the chunks, `execute` runs the model and samples, `update`
appends tokens and applies the stopping rules. The attention service drives this same
object; here it also runs the whole model itself.

Each step returns one `EngineOutput` per request that sampled a token: the new token and its
logprob only. The engine does not detokenise: stop strings are the client's
(services/common/text_stream.py), and `generate` reads them the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from services.attention.block_manager import BlockManager
from services.attention.grammar import GrammarError, Grammars
from services.attention.kv_cache import KVCache
from services.attention.sampler import new_generator, sample, token_logprobs
from services.attention.scheduler import (
    ScheduledChunk,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from services.attention.sequence import Sequence
from services.attention.step_inputs import prompt_row_positions
from services.common.completion import Completion, Completions
from services.common.config import ModelConfig
from services.common.detokenizer import Decoder
from services.common.engine_output import EngineOutput
from services.common.logprobs import TokenLogprob
from services.common.sampling_params import SamplingParams

KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn}


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # default: what kv_cache_bytes holds, capped by need
    kv_cache_bytes: int = 1 << 30
    max_model_len: int | None = None  # default: the model's max_position_embedding
    scheduler: SchedulerConfig = SchedulerConfig()
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs where they can be captured
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; "fp8": e4m3 (KV_CACHE_DTYPES)

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv cache dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                f"got {self.kv_cache_dtype!r}"
            )

    def kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """What the KV cache stores for a model of `model_dtype`."""
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or model_dtype


@dataclass
class EngineStats:
    """Counters since start, for logs and metrics."""

    num_steps: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_prefix_hit_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0


@dataclass(frozen=True)
class StepRecord:
    """The last step's shape and duration, for metrics."""

    num_sequences: int
    num_tokens: int
    seconds: float


class RequestError(ValueError):
    """A request the engine cannot serve as asked (too long, bad ids); nothing was queued."""


@dataclass
class _Request:
    seq: Sequence
    generator: torch.Generator
    matcher: Any = None  # its grammar's llguidance matcher, for structured output
    # Each prompt token's after the first, by position - 1, once computed (prompt_logprobs).
    prompt_logprobs: dict[int, TokenLogprob] | None = None


class Runner(Protocol):
    """Computes a step's chunks over the KV cache; returns logits [sampling chunks, V]."""

    model_config: ModelConfig
    device: torch.device

    def execute(self, chunks: list[ScheduledChunk]) -> Tensor: ...


def default_num_kv_blocks(cfg: ModelConfig, config: EngineConfig, dtype: torch.dtype) -> int:
    """What `kv_cache_bytes` holds, but no more than max_num_seqs full-length sequences."""
    if config.num_kv_blocks:
        return config.num_kv_blocks
    per_block = KVCache.bytes_per_block(cfg, config.block_size, config.kv_dtype(dtype))
    max_len = config.max_model_len or cfg.max_position_embedding
    enough = config.scheduler.max_num_seqs * -(-max_len // config.block_size)
    return max(1, min(config.kv_cache_bytes // per_block, enough))


def max_model_len(cfg: ModelConfig, config: EngineConfig, num_kv_blocks: int) -> int:
    """The longest sequence served: one of this length must always fit in the cache alone."""
    return min(
        config.max_model_len or cfg.max_position_embedding,
        cfg.max_position_embedding,
        num_kv_blocks * config.block_size,
    )


class Engine:
    def __init__(
        self,
        runner: Runner,
        num_kv_blocks: int,
        config: EngineConfig,
        tokenizer: Decoder | None = None,
    ) -> None:
        """`tokenizer`: the model's, for grammars (its `backend_json`) and `generate`'s text."""
        cfg = runner.model_config
        self.model_config = cfg
        self.config = config
        self.tokenizer = tokenizer
        self.runner = runner
        self.max_model_len = max_model_len(cfg, config, num_kv_blocks)
        self.block_manager = BlockManager(
            num_kv_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self._requests: dict[str, _Request] = {}
        self._device = runner.device
        self._grammars: Grammars | None = None  # made when a request first needs one
        self.stats = EngineStats()
        self.last_step: StepRecord | None = None

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already running")
        if not prompt_token_ids:
            raise RequestError("the prompt is empty: send at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(
                f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})"
            )
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model serves at most "
                f"{self.max_model_len} tokens including the output: shorten the prompt"
            )
        matcher = None if params.grammar is None else self._matcher(params.grammar)
        seq = Sequence(request_id, list(prompt_token_ids), params)
        generator = new_generator(params.seed, self._device)
        self._requests[request_id] = _Request(seq, generator, matcher=matcher)
        self.scheduler.add(seq)
        self.stats.num_prompt_tokens += len(prompt_token_ids)

    def _matcher(self, grammar: str) -> Any:
        if self._grammars is None:
            backend_json = getattr(self.tokenizer, "backend_json", None)
            if backend_json is None:
                raise RequestError(
                    "structured output needs the model's tokenizer, which this engine was "
                    "started without"
                )
            cfg = self.model_config
            self._grammars = Grammars(backend_json(), cfg.vocab_size, cfg.eos_token_ids)
        try:
            return self._grammars.matcher(grammar)
        except GrammarError as err:
            raise RequestError(str(err)) from None

    def abort_request(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is not None:
            self.scheduler.finish(request.seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def step(self) -> list[EngineOutput]:
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        tokens = self._execute(batch)
        outputs = self._update(batch, tokens)
        seconds = time.perf_counter() - start
        self.last_step = StepRecord(len(batch.chunks), batch.num_tokens, seconds)
        return outputs

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    def generate(
        self, prompts: Iterable[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Completion]:
        """Run prompts to completion; results in prompt order, their text read as a client
        reads it (a request whose stop string matched is aborted here)."""
        prompts = list(prompts)
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{i}" for i in range(len(prompts))]
        results = Completions(self.tokenizer)
        for request_id, prompt, p in zip(ids, prompts, all_params, strict=True):
            results.add_request(request_id, prompt, p)
            self.add_request(request_id, prompt, p)
        while self.has_unfinished_requests():
            for output in self.step():
                if results.add(output).finished and not output.finished:
                    self.abort_request(output.request_id)
        return [results[request_id] for request_id in ids]

    def _execute(self, batch: SchedulerOutput) -> list[tuple[int, TokenLogprob | None]]:
        """Sampled tokens (and their logprobs, where asked) in the order of sampling chunks.

        Runs even for an empty batch: a disaggregated runner must take part in every step.
        """
        logits = self.runner.execute(batch.chunks)  # [sampling chunks, V]
        sampling = [self._requests[c.seq.request_id] for c in batch.chunks if c.samples]
        params = [r.seq.params for r in sampling]
        generated = (
            [r.seq.output_token_ids for r in sampling]
            if any(p.has_penalties for p in params)
            else None
        )
        constrained = [(row, r.matcher) for row, r in enumerate(sampling) if r.matcher]
        allowed = logits if not constrained else self._grammars.constrain(logits, constrained)
        tokens = sample(allowed, params, [r.generator for r in sampling], generated)
        self._score_prompts(batch.chunks, getattr(self.runner, "prompt_logits", None))
        return [
            (token, None if p.logprobs is None else token_logprobs(logits[row], token, p.logprobs))
            for row, (token, p) in enumerate(zip(tokens, params, strict=True))
        ]

    def _score_prompts(self, chunks: list[ScheduledChunk], logits: Tensor | None) -> None:
        """Each prompt token's logprob from the rows before it (the runner's prompt rows,
        in chunk order), for the requests that ask."""
        if logits is None:
            return
        row = 0
        for chunk in chunks:
            positions = prompt_row_positions(chunk)
            if not positions:
                continue
            request = self._requests[chunk.seq.request_id]
            scored = request.prompt_logprobs = request.prompt_logprobs or {}
            num_top = chunk.seq.params.prompt_logprobs or 0
            for position in positions:
                token = chunk.seq.token_ids[position + 1]
                scored[position] = token_logprobs(logits[row], token, num_top)
                row += 1

    def _update(
        self, batch: SchedulerOutput, tokens: list[tuple[int, TokenLogprob | None]]
    ) -> list[EngineOutput]:
        self.scheduler.update(batch)
        self.stats.num_steps += 1
        self.stats.num_preemptions += len(batch.preempted)
        self.stats.num_prefix_hit_tokens += batch.num_prefix_hit_tokens
        self.stats.num_generated_tokens += len(tokens)
        sampled = iter(tokens)
        outputs = []
        for chunk in batch.chunks:
            if not chunk.samples:
                continue
            request = self._requests[chunk.seq.request_id]
            token, logprob = next(sampled)
            request.seq.token_ids.append(token)
            if request.matcher is not None:
                request.matcher.consume_token(token)
            reason, stop_token = self._stop(request, token)
            if reason is not None:
                self.scheduler.finish(request.seq, reason)
                del self._requests[chunk.seq.request_id]
            outputs.append(self._output(request, token, logprob, stop_token))
        return outputs

    def _stop(self, request: _Request, token: int) -> tuple[str | None, int | None]:
        """Whether `token` ends the request: (finish reason, the stop token id if one did).

        "stop" always means `token` is a stop token, whose text clients do not show. A
        grammar that has ended allows only EOS next (its mask), so it ends on one too.
        """
        seq, params = request.seq, request.seq.params
        eos = token in self.model_config.eos_token_ids
        if token in params.stop_token_ids:
            return "stop", token
        if eos and not params.ignore_eos:
            return "stop", None
        if eos and request.matcher is not None and request.matcher.is_stopped():
            return "stop", None  # ignore_eos, but the grammar allows nothing after its end
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length", None
        return None, None

    def _output(
        self, request: _Request, token: int, logprob: TokenLogprob | None, stop_token: int | None
    ) -> EngineOutput:
        seq = request.seq
        return EngineOutput(
            request_id=seq.request_id,
            new_token_ids=(token,),
            new_logprobs=() if logprob is None else (logprob,),
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            stop_reason=stop_token,
            num_prompt_tokens=len(seq.prompt_token_ids),
            num_cached_tokens=seq.num_cached_tokens,
            prompt_logprobs=self._prompt_logprobs(request),
        )

    def _prompt_logprobs(self, request: _Request) -> tuple[TokenLogprob, ...]:
        """Every prompt token's after the first, with the first generated token (asked for)."""
        seq = request.seq
        if seq.params.prompt_logprobs is None or len(seq.output_token_ids) != 1:
            return ()
        scored, request.prompt_logprobs = request.prompt_logprobs or {}, None
        return tuple(scored[p] for p in range(len(seq.prompt_token_ids) - 1))
