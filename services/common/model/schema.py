"""The checkpoint's tensors: every name the text model owns and its shape [out, in].

The single source of truth shared by the model (its parameter names), the loader (what it
expects to find) and the checkpoint writer (what it writes). No torch here.
"""

from __future__ import annotations

from services.common.config import ModelConfig

Shape = tuple[int, ...]


def layer_tensors(cfg: ModelConfig, layer: int) -> dict[str, Shape]:
    """Tensors of decoder layer `layer`, named as in the checkpoint."""
    h, q, d = cfg.hidden_size, cfg.share_q_dim, cfg.head_dim
    kv = cfg.num_attention_groups * d
    p = f"model.layers.{layer}."
    tensors: dict[str, Shape] = {
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.inter_norm.weight": (q,),
        p + "self_attn.wq.weight": (cfg.num_attention_heads * d, q),
        p + "self_attn.o_proj.weight": (h, cfg.num_attention_heads * d),
        p + "post_attention_layernorm.weight": (h,),
    }
    if cfg.is_moe_layer(layer):
        e, f, s = cfg.moe_num_experts, cfg.moe_intermediate_size, cfg.share_expert_dim
        tensors |= {
            p + "moe.gate.weight": (e, h),
            p + "moe.gate_proj.weight": (e, f, h),
            p + "moe.up_proj.weight": (e, f, h),
            p + "moe.down_proj.weight": (e, h, f),
            p + "share_expert.gate_proj.weight": (s, h),
            p + "share_expert.up_proj.weight": (s, h),
            p + "share_expert.down_proj.weight": (h, s),
        }
    else:
        i = cfg.intermediate_size
        tensors |= {
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    return tensors


def checkpoint_tensors(cfg: ModelConfig) -> dict[str, Shape]:
    """Every tensor of the text model, in checkpoint order (embedding, layers, norm, head)."""
    tensors: dict[str, Shape] = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    for layer in range(cfg.num_hidden_layers):
        tensors |= layer_tensors(cfg, layer)
    tensors["model.norm.weight"] = (cfg.hidden_size,)
    tensors["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return tensors


def is_norm(name: str) -> bool:
    """Norm weights are 1-D gains (initialised to one, never quantised)."""
    return name.endswith("norm.weight")


_FFN_PARTS = (".mlp.", ".share_expert.", ".moe.gate_proj.", ".moe.up_proj.", ".moe.down_proj.")


_ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "wq", "o_proj")


def is_attention_linear(name: str) -> bool:
    """The weight of one of MFA's five projections (what FP8 GEMMs serve on the GPU)."""
    return any(name.endswith(f".self_attn.{linear}.weight") for linear in _ATTENTION_LINEARS)


def is_mlp_linear(name: str) -> bool:
    """A dense MLP's or shared expert's projection (2-D, what `Fp8Linear` serves)."""
    return (".mlp." in name or ".share_expert." in name) and name.endswith("_proj.weight")


def is_routed_expert(name: str) -> bool:
    """A stacked routed-expert projection [E, ...] (what the grouped GEMMs serve)."""
    return ".moe." in name and name.endswith("_proj.weight")


def is_ffn_tensor(name: str) -> bool:
    """Feed-forward weights (dense MLP, shared and routed experts): the FFN side's in AFD.
    Everything else, the router included, stays on the attention side."""
    return any(part in name for part in _FFN_PARTS)
