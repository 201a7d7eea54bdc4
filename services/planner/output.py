"""What `afd plan` prints: readable tables, JSON-ready dicts and the Helm chart's values.

JSON keys are plain words with their unit where it is not a count (`predicted_tpot_ms`,
`stage_us`); costs are USD per 1M tokens. Scripts and the chart rely on them: the tests pin
the names. The Helm values are written by a tiny emitter (their shape is fixed and flat), so
printing them needs no YAML library. This module computes nothing new.
"""

from __future__ import annotations

import math
from typing import Any

from services.planner.cost import CostReport
from services.planner.deploy import Plan
from services.planner.stages import StageFit, attention_memory, message_bytes

STAGE_LABELS = {"attention": "attention", "ffn": "FFN", "a2f": "A2F", "f2a": "F2A"}


def cost_dict(report: CostReport) -> dict[str, Any]:
    work = report.work
    attention, ffn = report.cheapest_attention, report.cheapest_ffn
    return {
        "model": report.model,
        "context": work.context,
        "kv_bytes_per_element": report.kv_bytes_per_element,
        "kv_bytes": work.kv_bytes,
        "attention_flops": work.attention_flops,
        "linear_flops": work.linear_flops,
        "ffn_flops": work.ffn_flops,
        "arithmetic_intensity": work.arithmetic_intensity,
        "moe_sparsity": report.moe_sparsity,
        "attention_cost": attention.attention_cost,
        "attention_accelerator": attention.accelerator,
        "ffn_cost": ffn.ffn_cost,
        "ffn_accelerator": ffn.accelerator,
        "afd_cost": report.afd_cost,
        "cost_unit": "USD per 1M tokens",
        "accelerators": [
            {
                "name": c.accelerator,
                "price_per_hour": c.price_per_hour,
                "usd_per_flop": c.usd_per_flop,
                "usd_per_byte": c.usd_per_byte,
                "attention_cost": c.attention_cost,
                "attention_bound": c.attention_bound,
                "ffn_cost": c.ffn_cost,
                "min_moe_sparsity": c.min_moe_sparsity,
            }
            for c in report.per_accelerator
        ],
    }


def cost_table(report: CostReport) -> str:
    work = report.work
    kv_bits = int(report.kv_bytes_per_element * 8)
    lines = [
        f"{report.model} at {work.context} tokens of context, {kv_bits}-bit KV; per decoded token:",
        f"  KV read      {work.kv_bytes:.3g} B      attention {work.attention_flops:.3g} FLOP "
        f"({work.arithmetic_intensity:.0f} FLOP/B)",
        f"  linear       {work.linear_flops:.3g} FLOP   FFN       {work.ffn_flops:.3g} FLOP",
        "",
        "USD per 1M tokens      attention          FFN    min MoE sparsity",
        "accelerator   USD/h    cost   bound       cost   for its network",
    ]
    for c in report.per_accelerator:
        lines.append(
            f"{c.accelerator:<12} {c.price_per_hour:6.2f}   {c.attention_cost:.3f}  "
            f"{c.attention_bound:<8}   {c.ffn_cost:.3f}   {c.min_moe_sparsity:.3f}"
        )
    attention, ffn = report.cheapest_attention, report.cheapest_ffn
    lines += [
        "",
        f"AFD: attention on {attention.accelerator} ({attention.attention_cost:.3f}) + FFN on "
        f"{ffn.accelerator} ({ffn.ffn_cost:.3f}) = {report.afd_cost:.3f} USD per 1M tokens",
        f"{report.model}'s MoE sparsity: {report.moe_sparsity:.3f}",
    ]
    return "\n".join(lines)


def _fit_dict(fit: StageFit) -> dict[str, float]:
    return {"efficiency": fit.efficiency, "overhead_us": fit.overhead_s * 1e6}


def plan_dict(plan: Plan) -> dict[str, Any]:
    request, shape = plan.request, plan.shape
    cluster = request.cluster
    acc = cluster.accelerator
    tokens_per_s = plan.tokens_per_gpu_s * plan.total_gpus
    eff = cluster.efficiency
    return {
        "model": cluster.model.name,
        "gpu": acc.name,
        "context": cluster.context,
        "tpot_sla_ms": request.tpot_s * 1e3,
        "gpus_per_instance": cluster.gpus_per_instance,
        "network_gbps": cluster.network_bytes_per_s * 8 / 1e9,
        "attention_instances": shape.attention_instances,
        "ffn_instances": shape.ffn_instances,
        "attention_gpus": plan.attention_gpus,
        "ffn_gpus": plan.ffn_gpus,
        "total_gpus": plan.total_gpus,
        "micro_batches": shape.num_micro_batches,
        "micro_batch": shape.micro_batch,
        "batch_per_attention_gpu": plan.batch_per_attention_gpu,
        "total_batch": plan.batch_per_attention_gpu * plan.attention_gpus,
        "kv_capacity_sequences": plan.kv_capacity,
        "kv_bytes_per_element": cluster.kv_bytes_per_element,
        "kv_cache_bytes_per_attention_gpu": attention_memory(cluster)[1]
        * plan.batch_per_attention_gpu,
        "ffn_layout": shape.layout,
        # What one attention GPU sends and receives per token of one MoE (or, in a dense
        # model, dense) layer: one message to each FFN instance, one partial back from each.
        "network_bytes_per_token_layer": shape.ffn_instances
        * sum(message_bytes(cluster.model, cluster.model.ffn.is_moe)),
        "predicted_tpot_ms": plan.tpot_s * 1e3,
        "tokens_per_gpu_s": plan.tokens_per_gpu_s,
        "tokens_per_s": tokens_per_s,
        "cost_per_1m_tokens": plan.total_gpus * acc.price_per_hour / 3600 / tokens_per_s * 1e6,
        "binding": plan.binding,
        "slowest_stage": plan.slowest_stage,
        "stage_us": {k: v * 1e6 for k, v in plan.stages.as_dict().items()},
        "stage_budget_us": plan.stage_budget_s * 1e6,
        "efficiency": {
            "source": eff.source,
            "attention": _fit_dict(eff.attention),
            "ffn": _fit_dict(eff.ffn),
            "network": _fit_dict(eff.network),
        },
    }


def plan_table(plan: Plan) -> str:
    d = plan_dict(plan)
    g = d["gpus_per_instance"]
    layer = "MoE" if plan.request.cluster.model.ffn.is_moe else "dense"
    lines = [
        f"{d['model']} on {d['gpu']}: {d['context']} tokens of context, TPOT SLA "
        f"{d['tpot_sla_ms']:g} ms, instances of {g} GPU{'s' if g > 1 else ''}, "
        f"{d['network_gbps']:g} Gb/s per GPU",
        f"  attention instances  {d['attention_instances']:>4}  ({d['attention_gpus']} GPUs), "
        f"{d['micro_batch']} sequences per micro-batch per GPU, {d['batch_per_attention_gpu']} "
        f"in all (KV holds {d['kv_capacity_sequences']})",
        f"  FFN instances        {d['ffn_instances']:>4}  ({d['ffn_gpus']} GPUs), layout "
        f"{d['ffn_layout']}",
        f"  micro-batches        {d['micro_batches']:>4}",
        f"  network per token    {d['network_bytes_per_token_layer'] / 1e3:7.1f} KB per {layer} "
        "layer per attention GPU (both directions)",
        f"  predicted TPOT       {d['predicted_tpot_ms']:7.1f} ms",
        f"  tokens/GPU/s         {d['tokens_per_gpu_s']:7.0f}  ({d['tokens_per_s']:,.0f} tokens/s "
        f"on {d['total_gpus']} GPUs, {d['cost_per_1m_tokens']:.3f} USD per 1M tokens)",
        f"  binding              {d['binding']} (slowest stage: {d['slowest_stage']})",
        "",
        f"One {layer} layer, one micro-batch, against the stage budget "
        f"{d['stage_budget_us']:.0f} us (TPOT / micro-batches / layers):",
    ]
    budget = d["stage_budget_us"]
    for key, us in d["stage_us"].items():
        bar = "#" * min(40, round(20 * us / budget))
        lines.append(f"  {STAGE_LABELS[key]:<10} {us:7.0f} us  {us / budget:5.0%}  {bar}")
    lines.append(f"Stage fits: {d['efficiency']['source']}")
    return "\n".join(lines)


def helm_values(plan: Plan) -> str:
    """Values for deploy/helm/afd: an attention GPU is a one-GPU pod (an attention instance
    of G GPUs is G data-parallel ones), an FFN instance a pod of G GPUs (ffn.gpusPerInstance)."""
    d = plan_dict(plan)
    g = d["gpus_per_instance"]
    header = [
        f"# afd plan: {d['model']}, {d['context']} tokens of context, TPOT SLA "
        f"{d['tpot_sla_ms']:g} ms, {d['gpu']}",
        f"# predicted {d['tokens_per_gpu_s']:.0f} tokens/GPU/s at TPOT "
        f"{d['predicted_tpot_ms']:.1f} ms; binding: {d['binding']}",
    ]

    def gpu_limit(gpus: int) -> list[str]:
        return ["  resources:", "    limits:", f"      nvidia.com/gpu: {gpus}"]

    body = [
        "controller:",
        f"  microBatches: {d['micro_batches']}",
        f"  ffnLayout: {d['ffn_layout']}",  # the cluster's facts are the controller's values
        "attention:",
        f"  replicas: {d['attention_gpus']}",
        f"  maxNumSeqs: {d['batch_per_attention_gpu']}",
        f"  maxModelLen: {d['context']}",
        # The planned batch's KV cache, in the 8-bit cache the plan assumes (or the model's
        # dtype when planned with 2 bytes per element).
        f"  kvCacheDtype: {'fp8' if d['kv_bytes_per_element'] == 1 else 'auto'}",
        f"  kvCacheGiB: {max(1, math.ceil(d['kv_cache_bytes_per_attention_gpu'] / 2**30))}",
        *gpu_limit(1),
        "ffn:",
        f"  replicas: {d['ffn_instances']}",
        *([f"  gpusPerInstance: {g}"] if g > 1 else []),
        *gpu_limit(g),
        "gateway:",
        f"  tpotSlaMs: {d['tpot_sla_ms']:g}",
    ]
    return "\n".join(header + body) + "\n"


def serve_command(plan: Plan, model: str | None) -> str:
    """`afd serve`'s command line for the plan on one machine of enough GPUs: the topology
    the chart deploys. `model`: the checkpoint folder (None: planned from a preset, whose
    checkpoint the user names)."""
    d = plan_dict(plan)
    header = [] if model else [f"# CHECKPOINT: a folder holding a {d['model']} checkpoint"]
    command = " ".join([
        "afd serve --device cuda --model", model or "CHECKPOINT",
        f"--attention-instances {d['attention_gpus']}",
        f"--ffn-instances {d['ffn_instances']}",
        f"--gpus-per-ffn-instance {d['gpus_per_instance']}",
        f"--micro-batches {d['micro_batches']}",
        f"--ffn-layout {d['ffn_layout']}",
        f"--kv-cache-dtype {'fp8' if d['kv_bytes_per_element'] == 1 else 'auto'}",
    ])  # fmt: skip
    return "\n".join([*header, command]) + "\n"
