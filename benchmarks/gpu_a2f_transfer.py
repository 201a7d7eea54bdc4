"""Attention to FFN and back for one micro-batch over NCCL, on two GPUs of one host.

Rank 0 plays an attention instance, rank 1 an FFN instance. One round trip: rank 0 sends the
layer's A2F message (Step-3's MoE layout: activations [n, 7168] bf16, or e4m3 with per-token
scales, plus top-3 expert ids and weights) and receives the F2A answer ([n, 7168] bf16); rank 1
receives and answers at once (no compute), so the time is transfer and turnaround only.
- `stream-ordered`: isend/irecv whose `wait` only orders the GPU stream, timed by CUDA events
  per round trip, as a data plane with no host synchronisation inside a layer would run;
- `Transport`: the project's `Transport` as the AFD runner uses it on a GPU (a process group
  per channel; its waits only order the stream), with one host synchronisation per round
  trip, timed on the host;
- `timed waits`: the same with `Transport`'s gloo-style waits, which spin the host until each
  transfer ends (what the GPU data plane did before);
- `pack + unpack`: building and reading the A2F message (`activations.Layout`), one each.
Target (issue 6): at most 60 us per round trip for n = 128 over NVLink.

A script, not a test: `NCCL_NVLS_ENABLE=0 python benchmarks/gpu_a2f_transfer.py` on a machine
with two GPUs; prints a Markdown table (medians of --iterations round trips).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.activations import Layout  # noqa: E402
from services.common.transport import A2F, F2A, Transport, channel, channel_groups  # noqa: E402

HIDDEN, TOP_K = 7168, 3


def round_trips(n: int, fp8: bool, rank: int, iterations: int, groups) -> dict[str, float]:
    layout = Layout(HIDDEN, TOP_K, torch.bfloat16, fp8)
    a2f = torch.empty(n * layout.bytes_per_token, dtype=torch.uint8, device="cuda")
    f2a = torch.empty(n, HIDDEN, dtype=torch.bfloat16, device="cuda")
    peer = 1 - rank

    def one() -> None:
        if rank == 0:
            sent, got = dist.isend(a2f, peer), dist.irecv(f2a, peer)
            sent.wait()
            got.wait()
        else:
            dist.irecv(a2f, peer).wait()
            dist.isend(f2a, peer).wait()

    for _ in range(20):
        one()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iterations)]  # fmt: skip
    for start, end in events:
        start.record()
        one()
        end.record()
    torch.cuda.synchronize()
    ordered = statistics.median(s.elapsed_time(e) * 1e3 for s, e in events)

    host = {}
    out, back = channel(A2F, 0), channel(F2A, 0)
    for on_gpu in (True, False):
        transport = Transport({peer: "peer"}, timeout_s=30.0, groups=groups if on_gpu else None)
        times = []
        for _ in range(iterations):
            dist.barrier()
            started = time.perf_counter()
            if rank == 0:
                pending = [
                    transport.send(a2f, peer, out, "a2f"),
                    transport.recv(f2a, peer, back, "f2a"),
                ]
            else:
                transport.wait(transport.recv(a2f, peer, out, "a2f"))
                pending = [transport.send(f2a, peer, back, "f2a")]
            transport.drain(pending)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - started) * 1e6)
        host[on_gpu] = statistics.median(times)

    h = torch.randn(n, HIDDEN, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, 48, (n, TOP_K), device="cuda")
    weights = torch.rand(n, TOP_K, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        layout.unpack(layout.pack(a2f, h, ids, weights), n)
    end.record()
    torch.cuda.synchronize()
    pack = start.elapsed_time(end) * 1e3 / iterations
    nbytes = a2f.numel() + f2a.numel() * 2
    return {
        "bytes": nbytes,
        "ordered": ordered,
        "host": host[True],
        "timed": host[False],
        "pack": pack,
    }


def worker(rank: int, args: argparse.Namespace) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2, device_id=torch.device("cuda", rank))
    groups = channel_groups()
    rows = []
    for n in args.tokens:
        for fp8 in (False, True):
            rows.append((n, fp8, round_trips(n, fp8, rank, args.iterations, groups)))
    if rank == 0:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
        print(f"{datetime.date.today()}, 2 x {torch.cuda.get_device_name()}, torch "
              f"{torch.__version__}, NCCL {nccl}\n")  # fmt: skip
        print("| tokens | A2F dtype | bytes both ways | stream-ordered us | GB/s | Transport us "
              "| timed waits us | pack + unpack us |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for n, fp8, r in rows:
            gbps = r["bytes"] / r["ordered"] / 1e3
            cells = [str(n), "fp8 e4m3" if fp8 else "bf16", f"{r['bytes'] / 1e6:.2f} MB"]
            cells += [f"{r['ordered']:.1f}", f"{gbps:.0f}", f"{r['host']:.1f}"]
            cells += [f"{r['timed']:.1f}", f"{r['pack']:.1f}"]
            print("| " + " | ".join(cells) + " |")
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 256, 512, 2048])
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        print("needs two GPUs", file=sys.stderr)
        return 2
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    mp.spawn(worker, args=(args,), nprocs=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
