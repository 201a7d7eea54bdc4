"""The tiny model's throughput-versus-TPOT frontier on this machine's CPU, AFD against
colocated serving, measured with `afd bench`. A script, not a test.

    .venv/bin/python benchmarks/frontier_cpu.py [--sweep concurrency=1,2,4,8,16,32]
        [--num-requests 48] [--output-dir docs/results/cpu-frontier]

For each configuration it starts `afd serve` on a fresh tiny checkpoint, runs one
`afd bench --sweep` against its gateway, and stops it; then `afd bench plot` draws every
configuration on one PNG. All run the same weights, the same prompts (same seed) and the
same load, one after another on the same cores. The gateway's TPOT admission control is
switched off (`--tpot-sla-ms 1e6`) so the curve is the engine's, not the admission policy's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.cluster import Cluster, afd  # noqa: E402

CONFIGS = {
    "colocated": ["--colocated"],
    "AFD 1A1F K=1": ["--ffn-instances", "1", "--micro-batches", "1"],
    "AFD 1A2F K=3": ["--ffn-instances", "2", "--micro-batches", "3"],  # `make run`'s
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep", default="concurrency=1,2,4,8,16,32")
    parser.add_argument("--num-requests", default="48")
    parser.add_argument("--input-len", default="128")
    parser.add_argument("--output-len", default="64")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--output-dir", type=Path, default=Path("docs/results/cpu-frontier"))
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp()) / "tiny"
    assert afd("init-checkpoint", str(folder), "--preset", "tiny").wait() == 0
    results = []
    for label in args.configs:
        out = args.output_dir / label.replace(" ", "-").replace("=", "")
        cluster = Cluster(
            "--model", str(folder), "--tpot-sla-ms", "1e6", *CONFIGS[label], gateway=True
        )
        try:
            bench = afd(
                "bench", "--url", cluster.gateway_url, "--model", "tiny", "--label", label,
                "--sweep", args.sweep, "--num-requests", args.num_requests,
                "--input-len", args.input_len, "--output-len", args.output_len,
                "--warmup", "4", "--output-dir", str(out), "--no-progress",
                stdout=subprocess.PIPE,
            )  # fmt: skip
            output, _ = bench.communicate()
            print(output)
            if bench.returncode != 0:
                return bench.returncode
        finally:
            cluster.stop()
        results.append(max(out.glob("*.json"), key=lambda p: p.stat().st_mtime))
    plot = args.output_dir / "frontier.png"
    return afd("bench", "plot", *map(str, results), "-o", str(plot)).wait()


if __name__ == "__main__":
    sys.exit(main())
