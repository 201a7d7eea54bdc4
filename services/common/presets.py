"""Built-in model shapes for `afd init-checkpoint`.

`tiny` keeps Step-3's structure (dense first and last layers, MoE between them, one K/V head, a
low-rank query, a shared expert, top-3 routing, the real tokenizer's vocabulary) at sizes a CPU
runs in milliseconds. `step3` is the released model's per-layer shapes with a chosen layer count.
"""

from __future__ import annotations

from dataclasses import replace

from services.common.config import ModelConfig

STEP3_VOCAB_SIZE = 128815  # DeepSeek-V3's tokenizer, added tokens included
STEP3_BOS_TOKEN_ID = 0
STEP3_EOS_TOKEN_ID = 128805  # <|EOT|>

PRESETS = ("tiny", "step3")


def step3_config(num_layers: int = 61) -> ModelConfig:
    """Step-3's real shapes; with fewer layers, the first 4 and the last stay dense."""
    dense_head = min(4, num_layers)
    moe_layers = tuple(range(dense_head, num_layers - 1)) if num_layers > 5 else ()
    return ModelConfig(
        hidden_size=7168,
        num_hidden_layers=num_layers,
        vocab_size=STEP3_VOCAB_SIZE,
        num_attention_heads=64,
        num_attention_groups=1,
        head_dim=256,
        share_q_dim=2048,
        intermediate_size=18432,
        moe_layers=moe_layers,
        moe_num_experts=48,
        moe_top_k=3,
        moe_intermediate_size=5120,
        share_expert_dim=5120,
        norm_expert_weight=False,
        rope_theta=500000.0,
        max_position_embedding=65536,
        rms_norm_eps=1e-5,
        bos_token_id=STEP3_BOS_TOKEN_ID,
        eos_token_ids=(STEP3_EOS_TOKEN_ID,),
        torch_dtype="bfloat16",
    )


def tiny_config() -> ModelConfig:
    """Step-3 with 5 layers (0 and 4 dense, 1-3 MoE) at CPU-sized widths."""
    return replace(
        step3_config(5),
        moe_layers=(1, 2, 3),
        hidden_size=64,
        num_attention_heads=4,
        head_dim=32,
        share_q_dim=48,
        intermediate_size=128,
        moe_num_experts=8,
        moe_intermediate_size=32,
        share_expert_dim=32,
        max_position_embedding=4096,
    )


def preset_config(name: str, num_layers: int | None = None) -> ModelConfig:
    if name == "tiny":
        if num_layers is not None:
            raise ValueError("--layers applies to the step3 preset only")
        return tiny_config()
    if name == "step3":
        return step3_config(61 if num_layers is None else num_layers)
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
