"""The single-process engine: continuous batching over a paged KV cache.

    step():  schedule  ->  execute  ->  update

`schedule` (plain Python) picks the chunks, `execute` runs the model and samples, `update`
appends tokens and applies the stopping rules. The attention service drives this same
object; here it also runs the whole model itself.
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
from services.attention.output import RequestOutput, TextTracker
from services.attention.sampler import new_generator, sample, token_logprobs
from services.attention.scheduler import (
    ScheduledChunk,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from services.attention.sequence import Sequence
from services.attention.step_inputs import prompt_row_positions
from services.common.config import ModelConfig
from services.common.detokenizer import Decoder
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
    text: TextTracker
    generator: torch.Generator
    num_reported: int = 0  # generated tokens already handed out
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None
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
        text = TextTracker(
            self.tokenizer, seq.prompt_token_ids, params.stop, params.skip_special_tokens
        )
        generator = new_generator(params.seed, self._device)
        self._requests[request_id] = _Request(seq, text, generator, matcher=matcher)
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

    def step(self) -> list[RequestOutput]:
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
    ) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order."""
        prompts = list(prompts)
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(ids, prompts, all_params, strict=True):
            self.add_request(request_id, prompt, p)
        finished: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            finished |= {out.request_id: out for out in self.step() if out.finished}
        return [finished[request_id] for request_id in ids]

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
    ) -> list[RequestOutput]:
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
            if logprob is not None:
                request.logprobs = request.logprobs or []
                request.logprobs.append(logprob)
            self._check_stop(request)
            outputs.append(self._output(request))
            if request.seq.is_finished:
                del self._requests[chunk.seq.request_id]
        return outputs

    def _check_stop(self, request: _Request) -> None:
        seq, params = request.seq, request.seq.params
        token = seq.token_ids[-1]
        matched = request.text.add(token)
        reason: str | None = None
        stop_reason: int | str | None = None
        if token in params.stop_token_ids:
            reason, stop_reason = "stop", token
        elif not params.ignore_eos and token in self.model_config.eos_token_ids:
            reason = "stop"
        elif matched is not None:
            reason, stop_reason = "stop", matched
        elif request.matcher is not None and request.matcher.is_stopped():
            reason = "stop"  # the grammar has ended: nothing more may follow
        elif len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            request.text.finish(matched_stop=matched is not None)
            self.scheduler.finish(seq, reason)
            request.stop_reason = stop_reason

    def _output(self, request: _Request) -> RequestOutput:
        seq = request.seq
        generated = seq.output_token_ids
        new_ids = generated[request.num_reported :]
        request.num_reported = len(generated)
        new_text = request.text.release()
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(generated),
            text=request.text.released_text,
            new_token_ids=new_ids,
            new_text=new_text,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            stop_reason=request.stop_reason,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=None if request.logprobs is None else list(request.logprobs),
            prompt_logprobs=self._prompt_logprobs(request),
        )

    def _prompt_logprobs(self, request: _Request) -> list[TokenLogprob] | None:
        """Every prompt token's after the first, once the prompt is computed (asked for)."""
        if request.seq.params.prompt_logprobs is None or not request.seq.output_token_ids:
            return None
        scored = request.prompt_logprobs or {}
        return [scored[p] for p in range(len(request.seq.prompt_token_ids) - 1)]
