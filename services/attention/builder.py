"""Wiring: an `Engine` with the runner that fits where the model lives."""

from __future__ import annotations

from services.attention.decode_graphs import DecodeGraphs, capturable
from services.attention.engine import Engine, EngineConfig, default_num_kv_blocks, max_model_len
from services.attention.kv_cache import KVCache
from services.attention.model_runner import ModelRunner
from services.common.detokenizer import Decoder
from services.common.model.step3 import Step3ForCausalLM


def local_engine(
    model: Step3ForCausalLM, config: EngineConfig, tokenizer: Decoder | None = None
) -> Engine:
    """The whole model in this process: attention and FFN side by side."""
    dtype, device = model.lm_head.weight.dtype, model.lm_head.weight.device
    num_blocks = default_num_kv_blocks(model.cfg, config, dtype)
    cache = KVCache(model.cfg, num_blocks, config.block_size, dtype, device, config.kv_dtype(dtype))
    graphs = None
    if config.cuda_graphs and capturable(model, cache):
        longest = max_model_len(model.cfg, config, num_blocks)
        graphs = DecodeGraphs(model, cache, config.scheduler.max_num_seqs, longest)
    return Engine(ModelRunner(model, cache, graphs), num_blocks, config, tokenizer)
