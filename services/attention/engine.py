"""The single-process engine: continuous batching over a paged KV cache.

    step():  schedule  ->  execute  ->  update

`schedule` (plain Python) picks the chunks, `execute` runs the model and samples, `update`
appends tokens and applies the stopping rules. The attention service drives this same
object; here it also runs the whole model itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from services.attention.block_manager import BlockManager
from services.attention.kv_cache import KVCache
from services.attention.model_runner import ModelRunner
from services.attention.output import RequestOutput, TextTracker
from services.attention.sampler import new_generator, sample
from services.attention.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from services.attention.sequence import Sequence
from services.common.detokenizer import Decoder
from services.common.model.step3 import Step3ForCausalLM
from services.common.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # default: what kv_cache_bytes holds, capped by need
    kv_cache_bytes: int = 1 << 30
    max_model_len: int | None = None  # default: the model's max_position_embedding
    scheduler: SchedulerConfig = SchedulerConfig()
    enable_prefix_caching: bool = True


@dataclass
class EngineStats:
    """Counters since start, for logs and metrics."""

    num_steps: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_prefix_hit_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0


class RequestError(ValueError):
    """A request the engine cannot serve as asked (too long, bad ids); nothing was queued."""


@dataclass
class _Request:
    seq: Sequence
    text: TextTracker
    generator: torch.Generator
    num_reported: int = 0  # generated tokens already handed out
    stop_reason: int | str | None = None


class Engine:
    def __init__(
        self, model: Step3ForCausalLM, config: EngineConfig, tokenizer: Decoder | None = None
    ) -> None:
        cfg = model.cfg
        self.model_config = cfg
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = min(
            config.max_model_len or cfg.max_position_embedding, cfg.max_position_embedding
        )
        dtype = model.lm_head.weight.dtype
        num_blocks = config.num_kv_blocks or self._default_num_blocks(dtype)
        if num_blocks * config.block_size < self.max_model_len:
            # One sequence of the longest allowed length must always fit on its own.
            self.max_model_len = num_blocks * config.block_size
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        device = model.lm_head.weight.device
        self.runner = ModelRunner(model, KVCache(cfg, num_blocks, config.block_size, dtype, device))
        self._requests: dict[str, _Request] = {}
        self._device = device
        self.stats = EngineStats()

    def _default_num_blocks(self, dtype: torch.dtype) -> int:
        per_block = KVCache.bytes_per_block(self.model_config, self.config.block_size, dtype)
        blocks_per_seq = -(-self.max_model_len // self.config.block_size)
        enough = self.config.scheduler.max_num_seqs * blocks_per_seq
        return max(1, min(self.config.kv_cache_bytes // per_block, enough))

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
        seq = Sequence(request_id, list(prompt_token_ids), params)
        text = TextTracker(
            self.tokenizer, seq.prompt_token_ids, params.stop, params.skip_special_tokens
        )
        self._requests[request_id] = _Request(seq, text, new_generator(params.seed, self._device))
        self.scheduler.add(seq)
        self.stats.num_prompt_tokens += len(prompt_token_ids)

    def abort_request(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is not None:
            self.scheduler.finish(request.seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        tokens = self._execute(batch)
        return self._update(batch, tokens)

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

    def _execute(self, batch: SchedulerOutput) -> list[int]:
        if not batch.chunks:
            return []
        logits = self.runner.execute(batch.chunks)
        sampling = [self._requests[c.seq.request_id] for c in batch.chunks if c.samples]
        return sample(logits, [r.seq.params for r in sampling], [r.generator for r in sampling])

    def _update(self, batch: SchedulerOutput, tokens: list[int]) -> list[RequestOutput]:
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
            request.seq.token_ids.append(next(sampled))
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
        )
