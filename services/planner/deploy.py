"""The deployment planner: the AFD shape with the most tokens per GPU-second under a TPOT SLA.

It tries every attention and FFN instance count (up to `max_gpus` GPUs, and no more FFN GPUs
than routed experts), micro-batch count and FFN layout; for each, the largest micro-batch per
attention GPU whose step meets the SLA and whose KV cache fits; keeps the best tokens/GPU/s
(fewer GPUs on a tie). The step time and the stages are `stages`'s; what bound the batch is
reported with the plan:

- "attention KV capacity": the KV cache is full before the SLA is reached;
- "attention", "FFN", "network A2F" or "network F2A": the SLA is reached and this stage is the
  busiest in the MoE layers (the dense layers when the model has none).

Memory: weights and KV must fit in `memory_fraction` of each GPU (the rest is activations,
CUDA graphs, communication buffers); the paper's batches (128 sequences per micro-batch per
H800 at 4K, 64 at 8K, 16 at 32K) are what 0.8 holds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from services.common.cluster_config import LAYOUTS
from services.planner.stages import (
    Cluster,
    Shape,
    StageTimes,
    attention_memory,
    ffn_weight_bytes,
    stage_times,
    tpot,
)

PAPER_MEMORY_FRACTION = 0.8
STAGE_NAMES = {"attention": "attention", "ffn": "FFN", "a2f": "network A2F", "f2a": "network F2A"}
KV_CAPACITY = "attention KV capacity"
PATIENCE = 8  # instance counts tried past the best before the search stops adding more


@dataclass(frozen=True)
class Request:
    """What the user asks for. tpot_s: the SLA in seconds."""

    cluster: Cluster
    tpot_s: float
    max_gpus: int = 256
    micro_batch_counts: tuple[int, ...] = (1, 2, 3, 4)
    layouts: tuple[str, ...] = LAYOUTS
    memory_fraction: float = PAPER_MEMORY_FRACTION
    attention_instances: int | None = None  # fixed; None: searched
    ffn_instances: int | None = None

    def __post_init__(self) -> None:
        if not self.tpot_s > 0:
            raise ValueError(f"TPOT SLA must be positive, got {self.tpot_s * 1e3:g} ms")
        if self.max_gpus < 2 * self.cluster.gpus_per_instance:
            raise ValueError(
                f"max GPUs ({self.max_gpus}) must hold one attention and one FFN instance "
                f"of {self.cluster.gpus_per_instance} GPUs"
            )
        if not self.micro_batch_counts or min(self.micro_batch_counts) < 1:
            raise ValueError("micro-batch counts must be integers >= 1")
        unknown = set(self.layouts) - set(LAYOUTS)
        if unknown or not self.layouts:
            raise ValueError(f"FFN layouts must be among {', '.join(LAYOUTS)}")
        for name in ("attention_instances", "ffn_instances"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be >= 1, got {value}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory fraction must be in (0, 1], got {self.memory_fraction}")


@dataclass(frozen=True)
class Plan:
    """The chosen deployment and its predictions. Times in seconds."""

    request: Request
    shape: Shape
    tpot_s: float
    tokens_per_gpu_s: float
    binding: str  # what stopped the batch from growing (KV_CAPACITY or a stage)
    slowest_stage: str  # the busiest stage of a typical layer: it sets the step time
    stages: StageTimes  # one MoE layer's (a dense layer's for dense models)
    kv_capacity: int  # sequences one attention GPU's memory holds

    @property
    def attention_gpus(self) -> int:
        return self.shape.attention_instances * self.request.cluster.gpus_per_instance

    @property
    def ffn_gpus(self) -> int:
        return self.shape.ffn_instances * self.request.cluster.gpus_per_instance

    @property
    def total_gpus(self) -> int:
        return self.attention_gpus + self.ffn_gpus

    @property
    def batch_per_attention_gpu(self) -> int:
        """Sequences each attention GPU decodes at once (all its micro-batches)."""
        return self.shape.micro_batch * self.shape.num_micro_batches

    @property
    def stage_budget_s(self) -> float:
        """The SLA's share for one stage of one layer: TPOT / micro-batches / layers."""
        layers = self.request.cluster.model.num_layers
        return self.request.tpot_s / self.shape.num_micro_batches / layers


@dataclass(frozen=True)
class _Candidate:
    rate: float  # tokens/GPU/s
    gpus: int
    shape: Shape

    def beats(self, other: _Candidate | None) -> bool:
        return other is None or (self.rate, -self.gpus) > (other.rate, -other.gpus)


def plan(request: Request) -> Plan:
    """The best deployment; ValueError when none meets the SLA within max_gpus."""
    cluster = request.cluster
    g, ffn = cluster.gpus_per_instance, cluster.model.ffn
    sequences = kv_capacity(request)
    usable = cluster.accelerator.memory_bytes * request.memory_fraction
    best: _Candidate | None = None
    since_better = 0  # FFN counts tried since one raised the best rate
    for ffn_instances in _counts(request.ffn_instances, request.max_gpus // g - 1):
        if ffn.is_moe and ffn_instances * g > ffn.num_experts:
            break  # an FFN GPU without a routed expert of its own
        improved = False
        for layout in request.layouts:
            if ffn_weight_bytes(cluster.model, ffn_instances * g, layout) > usable:
                continue
            for m in request.micro_batch_counts:
                found = _scan_attention(request, ffn_instances, layout, m, sequences // m)
                if found is not None and found.beats(best):
                    best, improved = found, True
        since_better = 0 if improved else since_better + 1
        if since_better >= PATIENCE:
            break  # more FFN instances have stopped paying
    if best is None:
        raise ValueError(
            f"no deployment of up to {request.max_gpus} {cluster.accelerator.name} GPUs meets "
            f"a {request.tpot_s * 1e3:g} ms TPOT at {cluster.context} tokens of context: raise "
            "--tpot-ms or --max-gpus, or shorten the context"
        )
    return evaluate(request, best.shape)


def _scan_attention(
    request: Request, ffn_instances: int, layout: str, m: int, cap: int
) -> _Candidate | None:
    """The best attention instance count for one FFN count, layout and micro-batch count."""
    g = request.cluster.gpus_per_instance
    best: _Candidate | None = None
    since_best = 0
    most = request.max_gpus // g - ffn_instances
    for attention_instances in _counts(request.attention_instances, most):
        found = _largest_micro_batch(request, attention_instances, ffn_instances, m, layout, cap)
        if found is None:
            break  # more attention instances only add tokens to every stage
        shape, step = found
        gpus = (attention_instances + ffn_instances) * g
        candidate = _Candidate(
            shape.micro_batch * m * attention_instances * g / step / gpus, gpus, shape
        )
        if candidate.beats(best):
            best, since_best = candidate, 0
        else:  # the rate rises with attention instances, then falls: stop well past its top
            since_best += 1
            if since_best >= PATIENCE:
                break
    return best


def evaluate(request: Request, shape: Shape) -> Plan:
    """The predictions for one given deployment (whether or not it meets the SLA)."""
    cluster = request.cluster
    g = cluster.gpus_per_instance
    step = tpot(cluster, shape)
    gpus = (shape.attention_instances + shape.ffn_instances) * g
    rate = shape.micro_batch * shape.num_micro_batches * shape.attention_instances * g / step / gpus
    sequences = kv_capacity(request)
    typical = stage_times(cluster, shape, moe=cluster.model.ffn.is_moe)
    times = typical.as_dict()
    slowest = STAGE_NAMES[max(times, key=times.get)]
    binding = slowest
    if shape.micro_batch == sequences // shape.num_micro_batches:
        bigger = replace(shape, micro_batch=shape.micro_batch + 1)
        if tpot(cluster, bigger) <= request.tpot_s:
            binding = KV_CAPACITY  # the cache filled before the SLA was reached
    return Plan(request, shape, step, rate, binding, slowest, typical, sequences)


def kv_capacity(request: Request) -> int:
    """Sequences of the request's context that one attention GPU holds."""
    cluster = request.cluster
    weights, per_sequence = attention_memory(cluster)
    usable = cluster.accelerator.memory_bytes * request.memory_fraction
    sequences = int((usable - weights) // per_sequence) if usable > weights else 0
    if sequences < 1:
        raise ValueError(
            f"one attention GPU ({cluster.accelerator.name}) cannot hold the attention weights "
            f"and one {cluster.context}-token sequence in {request.memory_fraction:.0%} of "
            "its memory: shorten the context or choose a larger GPU"
        )
    return sequences


def _counts(fixed: int | None, most: int) -> range:
    return range(fixed, fixed + 1) if fixed is not None else range(1, most + 1)


def _largest_micro_batch(
    request: Request, attention: int, ffn: int, m: int, layout: str, cap: int
) -> tuple[Shape, float] | None:
    """The largest micro-batch b <= cap whose step meets the SLA (steps grow with b)."""
    if cap < 1:
        return None

    def step(b: int) -> float:
        return tpot(request.cluster, Shape(attention, ffn, b, m, layout))

    if step(1) > request.tpot_s:
        return None
    low, high = 1, cap
    while low < high:
        mid = (low + high + 1) // 2
        if step(mid) <= request.tpot_s:
            low = mid
        else:
            high = mid - 1
    return Shape(attention, ffn, low, m, layout), step(low)
