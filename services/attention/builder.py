"""Wiring: an `Engine` whose runner holds the whole model in this process."""

from __future__ import annotations

from services.attention.decode_graphs import capturable
from services.attention.engine import Engine, EngineConfig, default_num_kv_blocks, max_model_len
from services.attention.ffn_executor import LocalFFN
from services.attention.kv_cache import KVCache
from services.attention.model_runner import ModelRunner
from services.common.detokenizer import Decoder
from services.common.model.step3 import Step3ForCausalLM


def local_engine(
    model: Step3ForCausalLM,
    config: EngineConfig,
    tokenizer: Decoder | None = None,
    num_micro_batches: int = 1,
) -> Engine:
    """The whole model in this process: attention and FFN side by side. Micro-batches
    overlap nothing here; more than one only checks that the pipeline does not change tokens."""
    dtype, device = model.dtype, model.device
    num_blocks = default_num_kv_blocks(model.cfg, config, dtype)
    cache = KVCache(model.cfg, num_blocks, config.block_size, dtype, device, config.kv_dtype(dtype))
    runner = ModelRunner(model.attention, LocalFFN(model.ffn), cache, num_micro_batches)
    if config.cuda_graphs and capturable(dtype, cache):
        longest = max_model_len(model.cfg, config, num_blocks)
        runner.use_graphs(config.scheduler.max_num_seqs, longest)
    return Engine(runner, num_blocks, config, tokenizer)
