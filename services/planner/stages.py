"""Per-layer times of one AFD micro-batch: attention, FFN and the two transfers.

A roofline over datasheet peaks, turned into time by one `StageFit` per stage (time =
overhead + roofline / efficiency; the paper's own measurements or a calibration file supply
them). Per layer, for a micro-batch of b tokens on each attention GPU (B = b x attention GPUs
tokens on the FFN side), rooflines:

    attention = max(KV bytes / BW, attention FLOPs / F) + gemm(projections)
    FFN       = gemm(routed experts touched) + gemm(shared expert or dense MLP)
    gemm(W)   = weight bytes / BW + 2 x tokens x params / F     (weights stream, then math)
    A2F, F2A  = the busier NIC's bytes / NIC bandwidth

The attention kernel overlaps its KV stream with its math (flash decoding does); a decode
GEMM at a few hundred rows mostly does not, so its two parts add: this is what makes the FFN
stage grow with its batch from a large fixed cost, as the project's GPU measurements show
(docs/benchmarks.md, "one MoE layer" and the decode projection). Weights and KV are 8-bit;
A2F carries H FP8 bytes, a 4-byte scale and the top-k ids and weights (8 bytes each) per
token, F2A returns H bf16 values (the wire layout of services/common/activations.py).

Every attention GPU sends each token to every FFN instance, and every FFN instance returns a
partial sum (so the F2A traffic into an attention GPU grows with the FFN instance count); an
FFN instance of g GPUs spreads its traffic over g NICs. This module knows nothing of SLAs.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.cluster_config import SPLIT  # the layouts of the controller's --ffn-layout
from services.planner.hardware import Accelerator
from services.planner.shapes import ModelShape

WEIGHT_BYTES = 1.0  # FP8 weights and expert weights
EMBEDDING_BYTES = 2.0  # embedding and LM head stay bf16
SCALE_BYTES, ROUTE_BYTES, RETURN_BYTES = 4, 8, 2


@dataclass(frozen=True)
class StageFit:
    """time = overhead + roofline / efficiency: one stage's measured behaviour against its
    roofline. overhead_s: seconds per layer and micro-batch that do not shrink with the work
    (launches, synchronisation, message latency)."""

    efficiency: float
    overhead_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.efficiency <= 1.5:
            raise ValueError(f"a stage efficiency must be in (0, 1.5], got {self.efficiency!r}")
        if not 0 <= self.overhead_s < 0.1:
            raise ValueError(f"a stage overhead must be in [0, 100 ms), got {self.overhead_s!r} s")

    def time(self, roofline_s: float) -> float:
        return self.overhead_s + roofline_s / self.efficiency


# The paper's measurements against this module's rooflines (docs/planner.md derives them):
# attention from Table 9's two H800 points (281 us at 8K, 791 us at 32K; batch 64, bf16 KV);
# network from StepMesh's two directions (91 us for 1.8 MB, 182 us for 3.7 MB on 400 Gb/s);
# FFN: the paper publishes no FFN stage time, so it takes the attention's streaming efficiency
# and an overhead fitted to the 2A2F 4K headline (4,039 tokens/GPU/s).
PAPER_ATTENTION = StageFit(0.943, 46e-6)
PAPER_NETWORK = StageFit(0.404, 0.0)
PAPER_FFN = StageFit(0.943, 97e-6)


@dataclass(frozen=True)
class Efficiency:
    """How each stage's time relates to its roofline."""

    attention: StageFit = PAPER_ATTENTION
    ffn: StageFit = PAPER_FFN
    network: StageFit = PAPER_NETWORK
    source: str = "the paper's measurements (Table 9, StepMesh, the 4K headline)"


@dataclass(frozen=True)
class Cluster:
    """What does not change between candidate deployments."""

    model: ModelShape
    accelerator: Accelerator
    context: int  # KV positions each sequence holds
    gpus_per_instance: int = 1
    network_gbps: float | None = None  # per GPU; None: the accelerator's
    kv_bytes_per_element: float = 1.0
    efficiency: Efficiency = Efficiency()

    def __post_init__(self) -> None:
        if self.context <= 0:
            raise ValueError(f"context must be positive, got {self.context}")
        if self.gpus_per_instance <= 0:
            raise ValueError(f"GPUs per instance must be positive, got {self.gpus_per_instance}")
        if self.network_gbps is not None and not self.network_gbps > 0:
            raise ValueError(f"network bandwidth must be positive, got {self.network_gbps}")

    @property
    def network_bytes_per_s(self) -> float:
        gbps = self.accelerator.network_gbps if self.network_gbps is None else self.network_gbps
        return gbps * 1e9 / 8


@dataclass(frozen=True)
class Shape:
    """One candidate deployment. Instances are of `gpus_per_instance` GPUs each."""

    attention_instances: int
    ffn_instances: int
    micro_batch: int  # tokens (sequences) per attention GPU in one micro-batch
    num_micro_batches: int
    layout: str = SPLIT


@dataclass(frozen=True)
class StageTimes:
    """Seconds one micro-batch spends in each stage of one layer."""

    attention: float
    ffn: float
    a2f: float
    f2a: float

    def layer_time(self, num_micro_batches: int) -> float:
        """Every stage serves each micro-batch once per layer; one micro-batch's chain must
        also finish before its next layer starts."""
        busiest = max(self.attention, self.ffn, self.a2f, self.f2a)
        chain = self.attention + self.a2f + self.ffn + self.f2a
        return max(num_micro_batches * busiest, chain)

    def as_dict(self) -> dict[str, float]:
        return {"attention": self.attention, "ffn": self.ffn, "a2f": self.a2f, "f2a": self.f2a}


def gemm_time(params: float, tokens: float, acc: Accelerator) -> float:
    """Seconds for `tokens` rows through `params` FP8 weights: stream them, then the math."""
    return params * WEIGHT_BYTES / acc.memory_bandwidth + 2 * tokens * params / acc.matmul_flops


def attention_roofline(
    model: ModelShape, acc: Accelerator, micro_batch: float, context: int, kv_bytes: float
) -> float:
    """Seconds of one attention layer for `micro_batch` tokens at `context`, at the peaks.
    kv_bytes: bytes per cached element (1 for FP8)."""
    att = model.attention
    kv = micro_batch * context * att.kv_elements * kv_bytes
    flops = micro_batch * context * att.flops_per_context_token
    core = max(kv / acc.memory_bandwidth, flops / acc.matmul_flops)
    return core + gemm_time(att.linear_params, micro_batch, acc)


def ffn_roofline(
    model: ModelShape, acc: Accelerator, tokens: float, ffn_gpus: int, layout: str, moe: bool
) -> float:
    """Seconds of one FFN GPU's share of one layer for `tokens` (all attention GPUs')."""
    ffn = model.ffn
    whole = ffn.shared_params if moe else ffn.dense_params  # shared expert or dense MLP
    if layout == SPLIT:  # a 1/N column slice for every token
        time = gemm_time(whole / ffn_gpus, tokens, acc)
    else:  # the whole MLP for 1/N of the tokens
        time = gemm_time(whole, tokens / ffn_gpus, acc)
    if moe:
        k, e = ffn.top_k, ffn.num_experts
        touched = e * (1 - (1 - k / e) ** tokens)  # experts that see at least one token
        time += gemm_time(touched * ffn.expert_params / ffn_gpus, tokens * k / touched, acc)
    return time


def message_bytes(model: ModelShape, moe: bool) -> tuple[int, int]:
    """(A2F, F2A) bytes per token of one layer."""
    to_ffn = model.hidden_size + SCALE_BYTES + (ROUTE_BYTES * model.ffn.top_k if moe else 0)
    return to_ffn, RETURN_BYTES * model.hidden_size


def stage_times(cluster: Cluster, shape: Shape, moe: bool) -> StageTimes:
    """One MoE layer's (moe=True) or one dense layer's stage times."""
    model, acc, eff = cluster.model, cluster.accelerator, cluster.efficiency
    g, b = cluster.gpus_per_instance, shape.micro_batch
    tokens = b * shape.attention_instances * g  # B: the micro-batch on the FFN side
    attention = eff.attention.time(
        attention_roofline(model, acc, b, cluster.context, cluster.kv_bytes_per_element)
    )
    ffn_gpus = shape.ffn_instances * g
    ffn = eff.ffn.time(ffn_roofline(model, acc, tokens, ffn_gpus, shape.layout, moe))
    to_ffn, back = message_bytes(model, moe)
    nic = cluster.network_bytes_per_s
    fan_out = shape.ffn_instances  # each FFN instance gets every token, returns a partial
    a2f = eff.network.time(max(b * to_ffn * fan_out, tokens * to_ffn / g) / nic)
    f2a = eff.network.time(max(b * back * fan_out, tokens * back / g) / nic)
    return StageTimes(attention, ffn, a2f, f2a)


def tpot(cluster: Cluster, shape: Shape) -> float:
    """Seconds per decode step: the sum of every layer's time."""
    ffn = cluster.model.ffn
    total = 0.0
    for moe, count in ((True, ffn.num_moe_layers), (False, ffn.num_dense_layers)):
        if count:
            total += count * stage_times(cluster, shape, moe).layer_time(shape.num_micro_batches)
    return total


def attention_memory(cluster: Cluster) -> tuple[float, float]:
    """(weight bytes, KV bytes per sequence) on one attention GPU."""
    model = cluster.model
    weights = (
        model.attention.linear_params * model.num_layers * WEIGHT_BYTES
        + model.embedding_params * EMBEDDING_BYTES
    )
    per_sequence = (
        cluster.context
        * model.attention.kv_elements
        * cluster.kv_bytes_per_element
        * model.num_layers
    )
    return weights, per_sequence


def ffn_weight_bytes(model: ModelShape, ffn_gpus: int, layout: str) -> float:
    """FFN weights one FFN GPU holds: routed experts divided; dense/shared split or whole."""
    ffn = model.ffn
    routed = ffn.num_moe_layers * ffn.num_experts * ffn.expert_params / ffn_gpus
    whole = ffn.num_moe_layers * ffn.shared_params + ffn.num_dense_layers * ffn.dense_params
    return (routed + (whole / ffn_gpus if layout == SPLIT else whole)) * WEIGHT_BYTES
