"""The in-process FFN executor with reserved output buffers (what segment graphs replay over)
gives the tokens it gives without them.

Reserved, a micro-batch of up to `max_rows` rows leaves its FFN output in one of two buffers
per slot by layer parity, and a larger one (a prefill) in a tensor of its own; which one
`output` reads follows from (layer, rows) alone. Eager steps on the CPU exercise both kinds.
"""

from __future__ import annotations

import torch

from services.attention.builder import local_engine
from services.attention.engine import EngineConfig
from services.attention.scheduler import SchedulerConfig
from services.common.sampling_params import SamplingParams
from tests.support.models import random_model, small_config

CFG = small_config()
PROMPTS = [[5 + 7 * i + j for j in range(n)] for i, n in enumerate((3, 11, 6, 1, 9))]
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
CONFIG = EngineConfig(
    block_size=16,
    num_kv_blocks=64,
    scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
)


def test_reserved_output_buffers_give_the_same_tokens():
    model = random_model(CFG, torch.float32)
    plain = local_engine(model, CONFIG, num_micro_batches=2).generate(PROMPTS, PARAMS)
    reserved = local_engine(model, CONFIG, num_micro_batches=2)
    reserved.runner.ffn.reserve(4)  # decode micro-batches of 2-3 rows fit, prefills do not
    tokens = [out.token_ids for out in reserved.generate(PROMPTS, PARAMS)]
    assert tokens == [out.token_ids for out in plain]
    assert {slot for slot, _ in reserved.runner.ffn._buffers} == {0, 1}
