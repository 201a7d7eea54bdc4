"""Model shapes the cost model needs, from a checkpoint's config.json or a built-in preset.

Three config families are read, by `model_type`:
- `step3_vl` / `step3_text` (the LLM under `text_config` in the released wrapper; the same
  fields as services/common/config.py reads): MFA, one shared K/V head, a low-rank query;
- `deepseek_v3` / `deepseek_v2` / `kimi_k2`: MLA (a compressed latent KV), DeepSeekMoE;
- `qwen3_moe`, and dense `qwen3` / `qwen2` / `llama` / `mistral`: GQA.

Presets are written as config.json dicts and go through the same parser. This module knows
only shapes: no prices, no hardware, no weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.planner.shapes import FFNShape, HeadAttention, LatentAttention, ModelShape

STEP3_TYPES = ("step3_text", "step3_vl")
MLA_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2")
GQA_MOE_TYPES = ("qwen3_moe", "qwen2_moe")
GQA_DENSE_TYPES = ("qwen3", "qwen2", "llama", "mistral")
MODEL_TYPES = STEP3_TYPES + MLA_TYPES + GQA_MOE_TYPES + GQA_DENSE_TYPES

PRESETS: dict[str, dict[str, Any]] = {
    "step3": {
        "model_type": "step3_text",
        "hidden_size": 7168,
        "num_hidden_layers": 61,
        "vocab_size": 128815,
        "num_attention_heads": 64,
        "num_attention_groups": 1,
        "head_dim": 256,
        "share_q_dim": 2048,
        "intermediate_size": 18432,
        "moe_layers_enum": ",".join(str(i) for i in range(4, 60)),
        "moe_num_experts": 48,
        "moe_top_k": 3,
        "moe_intermediate_size": 5120,
        "share_expert_dim": 5120,
    },
    "deepseek-v3": {
        "model_type": "deepseek_v3",
        "hidden_size": 7168,
        "num_hidden_layers": 61,
        "vocab_size": 129280,
        "num_attention_heads": 128,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "n_shared_experts": 1,
        "first_k_dense_replace": 3,
    },
    "kimi-k2": {
        "model_type": "kimi_k2",
        "hidden_size": 7168,
        "num_hidden_layers": 61,
        "vocab_size": 163840,
        "num_attention_heads": 64,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "n_routed_experts": 384,
        "num_experts_per_tok": 8,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
    },
    "qwen3-235b-a22b": {
        "model_type": "qwen3_moe",
        "hidden_size": 4096,
        "num_hidden_layers": 94,
        "vocab_size": 151936,
        "num_attention_heads": 64,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "intermediate_size": 12288,
        "moe_intermediate_size": 1536,
        "num_experts": 128,
        "num_experts_per_tok": 8,
    },
    "qwen3-32b": {
        "model_type": "qwen3",
        "hidden_size": 5120,
        "num_hidden_layers": 64,
        "vocab_size": 151936,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 25600,
    },
}


@dataclass(frozen=True)
class _Fields:
    """A config dict that reports every missing field at once."""

    raw: dict[str, Any]
    model_type: str

    def require(self, *names: str) -> dict[str, int]:
        missing = [n for n in names if self.raw.get(n) is None]
        if missing:
            raise ValueError(
                f"config.json (model_type {self.model_type!r}) is missing "
                f"{', '.join(missing)}: the planner needs them to size the model"
            )
        return {n: self.integer(n) for n in names}

    def integer(self, name: str, default: int | None = None) -> int:
        value = self.raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config field {name!r} must be an integer, got {value!r}")
        return value


def load_model(name_or_dir: str) -> ModelShape:
    """A preset by name (case and '-'/'_' ignored) or a checkpoint folder's config.json."""
    path = Path(name_or_dir)
    if (path / "config.json").is_file():
        return model_from_config(read_config(path / "config.json"), path.name)
    if path.name == "config.json" and path.is_file():
        return model_from_config(read_config(path), path.parent.name or "model")
    if path.is_dir():
        raise ValueError(f"no config.json in {path}: is this a checkpoint folder?")
    wanted = _canonical(name_or_dir)
    for name, raw in PRESETS.items():
        if _canonical(name) == wanted:
            return model_from_config(raw, name)
    raise ValueError(
        f"unknown model {name_or_dir!r}: give a checkpoint folder holding config.json or one "
        f"of the presets {', '.join(PRESETS)}"
    )


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def read_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return raw


def model_from_config(raw: dict[str, Any], name: str) -> ModelShape:
    """Build a `ModelShape` from a config.json dict of a supported family."""
    if isinstance(raw.get("text_config"), dict):  # the Step-3 VL wrapper: the LLM is nested
        raw = {"model_type": "step3_text", **raw["text_config"]}
    model_type = raw.get("model_type")
    if model_type in STEP3_TYPES:
        return _step3(_Fields(raw, model_type), name)
    if model_type in MLA_TYPES:
        return _mla(_Fields(raw, model_type), name)
    if model_type in GQA_MOE_TYPES + GQA_DENSE_TYPES:
        return _gqa(_Fields(raw, model_type), name)
    raise ValueError(
        f"config field 'model_type' is {model_type!r}; the planner reads {', '.join(MODEL_TYPES)}"
    )


def _step3(f: _Fields, name: str) -> ModelShape:
    n = f.require(
        "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
        "num_attention_groups", "head_dim", "share_q_dim", "intermediate_size",
        "moe_num_experts", "moe_top_k", "moe_intermediate_size", "share_expert_dim",
    )  # fmt: skip
    layers = n["num_hidden_layers"]
    enum = f.raw.get("moe_layers_enum")
    try:  # a comma-separated string; absent means every layer but the first is MoE
        moe = {int(s) for s in enum.split(",") if s.strip()} if enum else set(range(1, layers))
    except (AttributeError, ValueError) as err:
        raise ValueError(
            f"config field 'moe_layers_enum' must be like \"4,5,6\", got {enum!r}"
        ) from err
    if not moe <= set(range(layers)):
        raise ValueError(f"config field 'moe_layers_enum' names layers outside 0..{layers - 1}")
    attention = HeadAttention(
        hidden_size=n["hidden_size"],
        num_heads=n["num_attention_heads"],
        num_kv_heads=n["num_attention_groups"],
        head_dim=n["head_dim"],
        q_rank=n["share_q_dim"],
    )
    ffn = FFNShape(
        hidden_size=n["hidden_size"],
        num_dense_layers=layers - len(moe),
        dense_intermediate=n["intermediate_size"],
        num_moe_layers=len(moe),
        num_experts=n["moe_num_experts"],
        top_k=n["moe_top_k"],
        expert_intermediate=n["moe_intermediate_size"],
        shared_intermediate=n["share_expert_dim"],
    )
    return ModelShape(name, n["hidden_size"], layers, n["vocab_size"], attention, ffn)


def _mla(f: _Fields, name: str) -> ModelShape:
    n = f.require(
        "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
        "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        "intermediate_size",
    )  # fmt: skip
    q_lora = f.raw.get("q_lora_rank")  # null in the smaller models: a full-rank query
    attention = LatentAttention(
        hidden_size=n["hidden_size"],
        num_heads=n["num_attention_heads"],
        q_lora_rank=None if q_lora is None else f.integer("q_lora_rank"),
        kv_lora_rank=n["kv_lora_rank"],
        qk_nope_head_dim=n["qk_nope_head_dim"],
        qk_rope_head_dim=n["qk_rope_head_dim"],
        v_head_dim=n["v_head_dim"],
    )
    layers = n["num_hidden_layers"]
    if f.raw.get("n_routed_experts") is None:
        ffn = FFNShape.dense(n["hidden_size"], layers, n["intermediate_size"])
    else:
        m = f.require("moe_intermediate_size", "n_routed_experts", "num_experts_per_tok")
        if f.integer("moe_layer_freq", 1) != 1:
            raise ValueError("config field 'moe_layer_freq' other than 1 is not supported")
        dense = min(f.integer("first_k_dense_replace", 0), layers)
        ffn = FFNShape(
            hidden_size=n["hidden_size"],
            num_dense_layers=dense,
            dense_intermediate=n["intermediate_size"],
            num_moe_layers=layers - dense,
            num_experts=m["n_routed_experts"],
            top_k=m["num_experts_per_tok"],
            expert_intermediate=m["moe_intermediate_size"],
            shared_intermediate=f.integer("n_shared_experts", 0) * m["moe_intermediate_size"],
        )
    return ModelShape(name, n["hidden_size"], layers, n["vocab_size"], attention, ffn)


def _gqa(f: _Fields, name: str) -> ModelShape:
    n = f.require(
        "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
        "intermediate_size",
    )  # fmt: skip
    hidden, heads, layers = n["hidden_size"], n["num_attention_heads"], n["num_hidden_layers"]
    attention = HeadAttention(
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=f.integer("num_key_value_heads", heads),
        head_dim=f.integer("head_dim", hidden // heads),
        q_rank=None,
    )
    tied = bool(f.raw.get("tie_word_embeddings", False))
    if f.model_type in GQA_DENSE_TYPES or not f.raw.get("num_experts"):
        ffn = FFNShape.dense(hidden, layers, n["intermediate_size"])
        return ModelShape(name, hidden, layers, n["vocab_size"], attention, ffn, tied)
    m = f.require("moe_intermediate_size", "num_experts", "num_experts_per_tok")
    step = f.integer("decoder_sparse_step", 1)
    dense_only = set(f.raw.get("mlp_only_layers") or [])
    moe = [i for i in range(layers) if i not in dense_only and (i + 1) % max(step, 1) == 0]
    ffn = FFNShape(
        hidden_size=hidden,
        num_dense_layers=layers - len(moe),
        dense_intermediate=n["intermediate_size"],
        num_moe_layers=len(moe),
        num_experts=m["num_experts"],
        top_k=m["num_experts_per_tok"],
        expert_intermediate=m["moe_intermediate_size"],
        shared_intermediate=f.integer("shared_expert_intermediate_size", 0),
    )
    return ModelShape(name, hidden, layers, n["vocab_size"], attention, ffn, tied)
