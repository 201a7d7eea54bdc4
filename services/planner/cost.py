"""The paper's decoding-cost model (STEP3.md section 3), in USD per 1M decoded tokens.

Per decoded token at context L, over all layers:

    Byte_KV     = L x kv_elements x kv_bytes x layers            (KV read; 8-bit by default)
    FLOP_attn   = L x 4 x heads x dot width x layers
    FLOP_linear = 2 x attention projection parameters x layers
    FLOP_FFN    = 2 x activated FFN parameters (top-k routed + shared, and dense layers)

    attention cost = max(FLOP_attn x U_flop, Byte_KV x U_byte) + FLOP_linear x U_flop
    FFN cost       = FLOP_FFN x U_flop
    AFD cost       = cheapest attention accelerator + cheapest FFN accelerator

with U_flop = price / 3600 / peak (FP8 where the chip has it, else BF16) and U_byte = price /
3600 / memory bandwidth. Communication is assumed hidden; embedding, LM head, router and norms
are left out. Everything else about serving (batch, latency, memory capacity) is deploy's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.planner.hardware import Accelerator
from services.planner.shapes import ModelShape

PER_MILLION = 1e6
# The paper's network budget in the sparsity bound: the step time left for A2F transfers.
PAPER_NETWORK_BUDGET_S = 11.1e-3


@dataclass(frozen=True)
class TokenWork:
    """One decoded token's work at a context, over all layers. Bytes and FLOPs."""

    context: int
    kv_bytes: float
    attention_flops: float
    linear_flops: float
    ffn_flops: float

    @property
    def arithmetic_intensity(self) -> float:
        """Attention FLOPs per KV byte: the chip is memory-bound below its FLOP/byte ratio."""
        return self.attention_flops / self.kv_bytes


def token_work(model: ModelShape, context: int, kv_bytes_per_element: float = 1.0) -> TokenWork:
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise ValueError(f"context must be a positive number of tokens, got {context!r}")
    if not kv_bytes_per_element > 0:
        raise ValueError(f"KV bytes per element must be positive, got {kv_bytes_per_element!r}")
    layers, attention = model.num_layers, model.attention
    return TokenWork(
        context=context,
        kv_bytes=context * attention.kv_elements * kv_bytes_per_element * layers,
        attention_flops=context * attention.flops_per_context_token * layers,
        linear_flops=2 * attention.linear_params * layers,
        ffn_flops=2 * model.ffn.activated_params,
    )


@dataclass(frozen=True)
class AcceleratorCost:
    """USD per 1M tokens of one accelerator for attention and for FFN; whether its
    attention is bound by memory bandwidth ("memory") or by compute ("compute")."""

    accelerator: str
    price_per_hour: float
    usd_per_flop: float
    usd_per_byte: float
    attention_cost: float
    ffn_cost: float
    attention_bound: str
    min_moe_sparsity: float


def accelerator_cost(
    model: ModelShape, work: TokenWork, accelerator: Accelerator
) -> AcceleratorCost:
    u_flop, u_byte = accelerator.usd_per_flop, accelerator.usd_per_byte
    compute, memory = work.attention_flops * u_flop, work.kv_bytes * u_byte
    attention = max(compute, memory) + work.linear_flops * u_flop
    return AcceleratorCost(
        accelerator=accelerator.name,
        price_per_hour=accelerator.price_per_hour,
        usd_per_flop=u_flop,
        usd_per_byte=u_byte,
        attention_cost=attention * PER_MILLION,
        ffn_cost=work.ffn_flops * u_flop * PER_MILLION,
        attention_bound="memory" if memory >= compute else "compute",
        min_moe_sparsity=min_moe_sparsity(model, accelerator),
    )


@dataclass(frozen=True)
class CostReport:
    """The cost model's answer for one model and context over a set of accelerators."""

    model: str
    moe_sparsity: float  # the model's own (activated / total expert parameters)
    kv_bytes_per_element: float
    work: TokenWork
    per_accelerator: tuple[AcceleratorCost, ...]

    @property
    def cheapest_attention(self) -> AcceleratorCost:
        return min(self.per_accelerator, key=lambda c: c.attention_cost)

    @property
    def cheapest_ffn(self) -> AcceleratorCost:
        return min(self.per_accelerator, key=lambda c: c.ffn_cost)

    @property
    def afd_cost(self) -> float:
        """USD per 1M tokens with attention and FFN each on its cheapest accelerator."""
        return self.cheapest_attention.attention_cost + self.cheapest_ffn.ffn_cost


def cost_report(
    model: ModelShape,
    context: int,
    accelerators: Iterable[Accelerator],
    kv_bytes_per_element: float = 1.0,
) -> CostReport:
    work = token_work(model, context, kv_bytes_per_element)
    costs = tuple(accelerator_cost(model, work, a) for a in accelerators)
    if not costs:
        raise ValueError("name at least one accelerator")
    return CostReport(model.name, model.ffn.sparsity, kv_bytes_per_element, work, costs)


def min_moe_sparsity(
    model: ModelShape, accelerator: Accelerator, budget_s: float = PAPER_NETWORK_BUDGET_S
) -> float:
    """The sparsity below which FFN GPUs cannot be fed enough tokens per expert.

    S >= H x FLOP/s x layers / (Net x memory bandwidth x budget): an expert is compute-bound
    once it sees FLOP/s / bandwidth tokens per step, and one server's NICs (Net, bytes/s) can
    bring at most Net x budget / (H x layers) tokens per step (H FP8 bytes per token and
    layer); a token reaches a fraction S of the experts.
    """
    return (
        model.hidden_size
        * accelerator.matmul_flops
        * model.num_layers
        / (accelerator.server_network_bytes_per_s * accelerator.memory_bandwidth * budget_s)
    )
