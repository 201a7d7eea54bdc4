"""Model hyperparameters read from a checkpoint's config.json.

Two forms exist: the released vision-language wrapper (`model_type` "step3_vl", the LLM under
`text_config`, token ids at the top level) and a bare `step3_text` config. Both become one
frozen `ModelConfig`. Field names and defaults are the checkpoint's own (STEP3.md section 1);
a bad or missing field raises `ConfigError` naming the field and the value.

This module knows nothing of torch, weights or serving options.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TEXT_MODEL_TYPE = "step3_text"
VL_MODEL_TYPE = "step3_vl"
DEFAULT_RMS_NORM_EPS = 1e-5


# Integer fields that must be present and positive.
POSITIVE_INT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "num_attention_heads",
    "num_attention_groups",
    "head_dim",
    "share_q_dim",
    "intermediate_size",
    "moe_num_experts",
    "moe_top_k",
    "moe_intermediate_size",
    "share_expert_dim",
    "max_position_embedding",
)


class ConfigError(ValueError):
    """A config.json field is missing or holds a value the model cannot use."""


@dataclass(frozen=True)
class ModelConfig:
    """The Step-3 text model's shape. Counts are `num_*`; dims are sizes of one vector."""

    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    num_attention_heads: int
    num_attention_groups: int  # K/V heads; Step-3 has one, shared by every query head
    head_dim: int
    share_q_dim: int  # rank of the low-rank query
    intermediate_size: int  # dense SwiGLU layers
    moe_layers: tuple[int, ...]
    moe_num_experts: int
    moe_top_k: int
    moe_intermediate_size: int
    share_expert_dim: int
    norm_expert_weight: bool
    rope_theta: float
    max_position_embedding: int
    rms_norm_eps: float
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    torch_dtype: str

    def __post_init__(self) -> None:
        for name in POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"config field {name!r} must be a positive integer, got {value!r}"
                )
        if self.num_attention_heads % self.num_attention_groups:
            raise ConfigError(
                f"config field 'num_attention_groups' ({self.num_attention_groups}) must divide "
                f"'num_attention_heads' ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config field 'head_dim' must be even for RoPE, got {self.head_dim}")
        if self.moe_top_k > self.moe_num_experts:
            raise ConfigError(
                f"config field 'moe_top_k' ({self.moe_top_k}) exceeds 'moe_num_experts' "
                f"({self.moe_num_experts})"
            )
        for layer in self.moe_layers:
            if not 0 <= layer < self.num_hidden_layers:
                raise ConfigError(
                    f"config field 'moe_layers_enum' names layer {layer}, outside "
                    f"0..{self.num_hidden_layers - 1}"
                )
        if not self.rope_theta > 0:
            raise ConfigError(
                f"config field 'rope_theta' must be positive, got {self.rope_theta!r}"
            )
        if not 0 < self.rms_norm_eps < 1:
            raise ConfigError(
                f"config field 'rms_norm_eps' must be in (0, 1), got {self.rms_norm_eps!r}"
            )
        for token in (self.bos_token_id, *self.eos_token_ids):
            if not 0 <= token < self.vocab_size:
                raise ConfigError(
                    f"token id {token} is outside the vocabulary (0..{self.vocab_size - 1})"
                )

    @property
    def num_query_heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_attention_groups

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def to_text_config(self) -> dict[str, Any]:
        """The bare `step3_text` config.json form, as `parse_config` reads it back."""
        raw = asdict(self)
        del raw["moe_layers"], raw["eos_token_ids"]
        raw["model_type"] = TEXT_MODEL_TYPE
        raw["architectures"] = ["Step3TextForCausalLM"]
        raw["moe_layers_enum"] = ",".join(str(layer) for layer in self.moe_layers)
        raw["eos_token_id"] = list(self.eos_token_ids)
        del raw["rms_norm_eps"]  # the released checkpoint leaves it out; the default applies
        if self.rms_norm_eps != DEFAULT_RMS_NORM_EPS:
            raw["rms_norm_eps"] = self.rms_norm_eps
        return raw

    def to_vl_config(self) -> dict[str, Any]:
        """The released vision-language wrapper form: the LLM under `text_config`."""
        text = self.to_text_config()
        return {
            "model_type": VL_MODEL_TYPE,
            "architectures": ["Step3VLForConditionalGeneration"],
            "bos_token_id": text.pop("bos_token_id"),
            "eos_token_id": text.pop("eos_token_id"),
            "torch_dtype": self.torch_dtype,
            "text_config": text,
        }


def load_config(checkpoint_dir: str | Path) -> ModelConfig:
    """Read `<checkpoint_dir>/config.json` in either form."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {checkpoint_dir}: is this a checkpoint folder?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err
    return parse_config(raw)


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Build a `ModelConfig` from a config.json dict (VL wrapper or bare text config)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config.json must hold an object, got {type(raw).__name__}")
    model_type = raw.get("model_type", TEXT_MODEL_TYPE)
    if model_type == VL_MODEL_TYPE or "text_config" in raw:
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"config field 'text_config' must be an object, got {text!r}")
        # Token ids live at the top level of the wrapper and win over any copy in text_config.
        outer = {k: raw[k] for k in ("bos_token_id", "eos_token_id", "torch_dtype") if k in raw}
        text = {**{k: v for k, v in text.items() if v is not None}, **outer}
        model_type = text.get("model_type", TEXT_MODEL_TYPE)
    else:
        text = raw
    if model_type != TEXT_MODEL_TYPE:
        raise ConfigError(
            f"config field 'model_type' is {model_type!r}; this server runs "
            f"{TEXT_MODEL_TYPE!r} (or its {VL_MODEL_TYPE!r} wrapper)"
        )
    if text.get("rope_scaling"):
        raise ConfigError(
            f"config field 'rope_scaling' is not supported, got {text['rope_scaling']!r}"
        )

    ints = {name: _int_field(text, name) for name in POSITIVE_INT_FIELDS}
    return ModelConfig(
        **ints,
        moe_layers=_moe_layers(text, ints["num_hidden_layers"]),
        norm_expert_weight=_bool_field(text, "norm_expert_weight", default=False),
        rope_theta=_rope_theta(text),
        rms_norm_eps=_float_field(text, "rms_norm_eps", default=DEFAULT_RMS_NORM_EPS),
        bos_token_id=_int_field(text, "bos_token_id"),
        eos_token_ids=_eos_ids(text),
        torch_dtype=_dtype_field(text),
    )


def _int_field(raw: dict[str, Any], name: str) -> int:
    if name not in raw:
        raise ConfigError(f"config.json is missing the field {name!r}")
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config field {name!r} must be an integer, got {value!r}")
    return value


def _float_field(raw: dict[str, Any], name: str, default: float | None = None) -> float:
    if name not in raw:
        if default is None:
            raise ConfigError(f"config.json is missing the field {name!r}")
        return default
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"config field {name!r} must be a number, got {value!r}")
    return float(value)


def _bool_field(raw: dict[str, Any], name: str, default: bool) -> bool:
    value = raw.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"config field {name!r} must be true or false, got {value!r}")
    return value


def _moe_layers(raw: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    """`moe_layers_enum` is a comma-separated string; absent means every layer but the first."""
    value = raw.get("moe_layers_enum")
    if value is None:
        return tuple(range(1, num_layers))
    if not isinstance(value, str):
        raise ConfigError(
            f"config field 'moe_layers_enum' must be a comma-separated string, got {value!r}"
        )
    if not value.strip():
        raise ConfigError(
            "config field 'moe_layers_enum' is empty; list the MoE layers or leave the field out"
        )
    try:
        layers = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError as err:
        raise ConfigError(
            f"config field 'moe_layers_enum' must list layer numbers like \"4,5,6\", got {value!r}"
        ) from err
    return tuple(sorted(set(layers)))


def _rope_theta(raw: dict[str, Any]) -> float:
    """Older configs say `rope_theta`; newer transformers nest it in `rope_parameters`."""
    params = raw.get("rope_parameters")
    if "rope_theta" not in raw and isinstance(params, dict):
        if params.get("rope_type", "default") != "default":
            raise ConfigError(
                f"config field 'rope_parameters' asks for rope_type {params['rope_type']!r}; "
                "only plain RoPE ('default') is supported"
            )
        return _float_field(params, "rope_theta")
    return _float_field(raw, "rope_theta")


def _eos_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    if "eos_token_id" not in raw:
        raise ConfigError("config.json is missing the field 'eos_token_id'")
    value = raw["eos_token_id"]
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ConfigError(
            f"config field 'eos_token_id' must be an integer or a list of integers, got {value!r}"
        )
    return tuple(values)


_DTYPES = ("bfloat16", "float16", "float32")


def _dtype_field(raw: dict[str, Any]) -> str:
    value = raw.get("torch_dtype", "bfloat16")
    if value not in _DTYPES:
        raise ConfigError(f"config field 'torch_dtype' must be one of {_DTYPES}, got {value!r}")
    return value
