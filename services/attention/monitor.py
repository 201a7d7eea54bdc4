"""An attention instance's engine and AFD pipeline, read into its Prometheus metrics.

Gauges (KV blocks, running and waiting sequences) are read when Prometheus scrapes; the
per-step histograms and the counters are fed by `after_step`, which the engine driver calls
on its own thread after every step that computed something.
"""

from __future__ import annotations

from dataclasses import replace

from services.attention.engine import Engine, EngineStats
from services.common.metrics import DIRECTIONS, AttentionMetrics, StepSampler
from services.common.pipeline_timer import PipelineTimer


class EngineMonitor:
    def __init__(self, engine: Engine, metrics: AttentionMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        blocks = engine.block_manager
        scheduler = engine.scheduler
        metrics.kv_blocks_total.set_function(lambda: blocks.num_blocks)
        metrics.kv_blocks_used.set_function(lambda: blocks.num_blocks - blocks.num_free_blocks)
        metrics.kv_cache_usage.set_function(
            lambda: 1 - blocks.num_free_blocks / blocks.num_blocks if blocks.num_blocks else 0.0
        )
        metrics.running.set_function(lambda: len(scheduler.running))
        metrics.waiting.set_function(lambda: len(scheduler.waiting))
        self._counted = EngineStats()

    def after_step(self) -> None:
        step = self.engine.last_step
        if step is None or step.num_sequences == 0:
            return  # an idle lockstep step says nothing about serving
        m = self.metrics
        m.batch_sequences.observe(step.num_sequences)
        m.batch_tokens.observe(step.num_tokens)
        m.step_time.observe(step.seconds)
        now, before = self.engine.stats, self._counted
        m.prompt_tokens.inc(now.num_prompt_tokens - before.num_prompt_tokens)
        m.generation_tokens.inc(now.num_generated_tokens - before.num_generated_tokens)
        m.prefix_hit_tokens.inc(now.num_prefix_hit_tokens - before.num_prefix_hit_tokens)
        m.preemptions.inc(now.num_preemptions - before.num_preemptions)
        self._counted = replace(now)


class PipelineMonitor:
    """Sampled steps' stage times into the attention instance's pipeline metrics."""

    def __init__(self, metrics: AttentionMetrics, sampler: StepSampler) -> None:
        self.metrics = metrics
        self.sampler = sampler

    def sampled(self) -> bool:
        """Whether the step about to run is one to time."""
        return self.sampler.next()

    def record(self, timer: PipelineTimer) -> None:
        m, step = self.metrics, timer.elapsed()
        for seconds in timer.computes:
            m.layer_attention_time.observe(seconds)
        for direction in DIRECTIONS:
            m.transfer_wait.labels(direction).observe(timer.waits.get(direction, 0.0))
        ffn_wait = timer.waits.get("f2a", 0.0)
        m.ffn_wait.observe(ffn_wait)
        m.bubble_ratio.set(ffn_wait / step if step > 0 else 0.0)
