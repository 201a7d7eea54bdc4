"""afd_cpu.py's data-plane section: one layer's A2F message and F2A answer between two
processes through the production `Transport` on gloo, in the wire layout (`Layout`) of the
tiny model and of Step-3."""

from __future__ import annotations

import time
from datetime import timedelta
from statistics import median

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.common.activations import Layout
from services.common.transport import Transport


def ping_pong(rank: int, port: int, messages: list[tuple[int, int]], iterations: int) -> None:
    """One layer's transfers, over and over: rank 0 (attention) sends a2f bytes, rank 1 (FFN)
    answers f2a bytes; through the production `Transport` on gloo. Rank 0 stores the medians."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=dist.PrefixStore("pp", store), rank=rank, world_size=2)
    transport = Transport({0: "attention", 1: "ffn"}, 30.0)
    peer = 1 - rank
    medians = []
    for a2f, f2a in messages:
        request, answer = torch.zeros(a2f, dtype=torch.uint8), torch.zeros(f2a, dtype=torch.uint8)
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            if rank == 0:
                sent = transport.send(request, peer, 0, "a2f")
                back = transport.recv(answer, peer, 0, "f2a")
                transport.wait(sent)
                transport.wait(back)
            else:
                transport.wait(transport.recv(request, peer, 0, "a2f"))
                transport.wait(transport.send(answer, peer, 0, "f2a"))
            times.append(time.perf_counter() - start)
        medians.append(median(times[iterations // 10 :]))
    if rank == 0:
        store.set("medians", " ".join(map(str, medians)))
    dist.destroy_process_group()


def bench_data_plane(batches: list[int], pings: int, stage_s: float) -> list[str]:
    """A2F + F2A of one layer and micro-batch, in the wire layout `afd serve` uses; each
    round trip also as a fraction of `stage_s`, the paper's budget per layer and stage."""
    tiny = Layout(64, 3, torch.float32, fp8=False)
    step3 = Layout(7168, 3, torch.bfloat16, fp8=True)
    cases = [(f"tiny fp32, {b} tokens", b * tiny.bytes_per_token, b * 64 * 4) for b in batches]
    cases += [
        (f"Step-3 FP8 dispatch / bf16 return, {n} tokens", n * step3.bytes_per_token, n * 7168 * 2)
        for n in (128, 2048)
    ]
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    messages = [(a2f, f2a) for _, a2f, f2a in cases]
    mp.start_processes(ping_pong, (store.port, messages, pings), nprocs=2, start_method="spawn")
    medians = [float(m) for m in store.get("medians").decode().split()]
    lines = [
        "| message (one layer, one micro-batch) | A2F bytes | F2A bytes | round trip us "
        "| / 272 us |",
        "|---|---|---|---|---|",
    ]
    for (name, a2f, f2a), seconds in zip(cases, medians, strict=True):
        lines.append(f"| {name} | {a2f} | {f2a} | {seconds * 1e6:.0f} | {seconds / stage_s:.2f}x |")
    return lines
