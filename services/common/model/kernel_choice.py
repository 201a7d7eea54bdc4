"""The build-time pass that gives each layer its implementation: a Triton kernel or plain torch.

Layers are constructed with their plain-torch references (the attention half on the meta
device, before any weight is loaded, so where they will run is not known yet). Once the
weights are in place, `choose_kernels` looks at where each layer's weights live and in what
dtype, and swaps in the kernel where `kernels.available` says it runs and the kernel takes
that dtype and shape:

    RMSNorm.impl                    rms_norm_reference  ->  norm_rope.rms_norm
    MFAAttention.rope               rope_reference      ->  norm_rope.rope
    RoutedExperts.expert_forward    the expert loop     ->  grouped GEMMs (`expert_forward_on`)
    Fp8RoutedExperts.expert_forward torch around GEMMs  ->  Triton around them
                                                            (`fp8_expert_forward_on`)
    BlockFp8RoutedExperts.expert_forward  plain torch   ->  Triton and DeepGEMM on Hopper
                                                            (`block_expert_forward_on`)

`build.py` runs it on both halves (`build_attention_half`, `build_ffn_half`), so the whole
model, an attention instance's half and an FFN instance's shard all get it. Nothing is
decided in `forward`. A half moved to another device after the pass (`.to()`) keeps its
choice: build it where it will run, or run the pass again.
"""

from __future__ import annotations

from torch import nn

from services.common import kernels
from services.common.kernels import norm_rope
from services.common.model.attention import MFAAttention
from services.common.model.block_fp8_moe import block_expert_forward_on
from services.common.model.ffn_half import BlockFp8RoutedExperts, Fp8RoutedExperts, RoutedExperts
from services.common.model.fp8_moe import fp8_expert_forward_on
from services.common.model.layers import RMSNorm
from services.common.model.moe import expert_forward_on


def choose_kernels(model: nn.Module) -> None:
    """Give every RMSNorm, MFA attention and routed-expert block in `model` its
    implementation for the device and dtype of its own weights (layers still on the meta
    device keep the references)."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            weight = module.weight
            fits = weight.dtype in norm_rope.DTYPES and weight.numel() <= norm_rope.MAX_NORM_DIM
            fast = fits and kernels.available(weight.device)
            module.impl = norm_rope.rms_norm if fast else norm_rope.rms_norm_reference
        elif isinstance(module, MFAAttention):
            # q and k come out in inter_norm's dtype, the model's (FP8 linears give bf16)
            weight = module.inter_norm.weight
            fast = weight.dtype in norm_rope.DTYPES and kernels.available(weight.device)
            module.rope = norm_rope.rope if fast else norm_rope.rope_reference
        elif isinstance(module, RoutedExperts):
            weight = module.gate_proj.weight
            module.expert_forward = expert_forward_on(weight.device, weight.dtype)
        elif isinstance(module, Fp8RoutedExperts):
            module.expert_forward = fp8_expert_forward_on(module.experts.gate.device)
        elif isinstance(module, BlockFp8RoutedExperts):
            module.expert_forward = block_expert_forward_on(module.experts.gate_up.device)
