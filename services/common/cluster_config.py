"""The facts every attention and FFN instance of one AFD cluster must agree on.

They are declared once, by the controller's flags (`afd controller`, which `afd serve` and
the Helm chart pass), and travel in the membership every member joins; no instance has flags
of its own for them, so two instances cannot disagree and fail mid-run:

- `num_micro_batches`: every step plan has that many counts per attention instance, and both
  sides run the pipeline that deep.
- `max_num_batched_tokens`: the attention schedulers' per-step token budget, which also sizes
  the FFN instances' receive buffers (a step larger than an FFN's buffers cannot be received).
- `fp8_dispatch`: the wire layout of the activations (e4m3 + per-token scales, or the
  model's dtype); a sender and a receiver that differ read garbage.
- `ffn_layout`: how the FFN instances share the dense MLPs and the shared expert; every FFN
  instance must hold its part of the same split.
- `ffn_instance_size`: processes (GPUs) per FFN instance, G. Every member derives from it
  which FFN processes form an instance and which one each attention instance sends to
  (services/common/ffn_instances.py); the experts are split over all N x G processes.

Per instance, and so not here: the KV cache (its dtype, size and block size) never leaves its
attention instance, so instances on different GPUs may choose differently; likewise
`max_num_seqs`, `max_model_len`, prefix caching, the device and the timeouts.

Plain values; knows nothing of gRPC or torch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

SPLIT = "split"  # each FFN instance holds a slice of every MLP's columns: partial sums
REPLICATED = "replicated"  # each holds whole MLPs, for the attention instances it serves
LAYOUTS = (SPLIT, REPLICATED)

# The data plane has a channel per micro-batch and direction (transport.py): 4 of them.
MAX_MICRO_BATCHES = 4
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512


class ClusterConfigChanged(ValueError):
    """The controller now hands out other facts than those this instance was built with
    (it restarted with other flags): the instance must be started again."""


@dataclass(frozen=True)
class ClusterConfig:
    num_micro_batches: int = 3  # the paper's pipeline depth
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS  # per attention instance, step
    fp8_dispatch: bool = False  # activations towards the FFN side as e4m3 + per-token scales
    ffn_layout: str = SPLIT  # dense MLPs and the shared expert: SPLIT or REPLICATED
    ffn_instance_size: int = 1  # G: processes (GPUs) per FFN instance

    def __post_init__(self) -> None:
        if not _is_int(self.num_micro_batches) or not (
            1 <= self.num_micro_batches <= MAX_MICRO_BATCHES
        ):
            raise ValueError(
                f"num_micro_batches (--micro-batches) must be 1 to {MAX_MICRO_BATCHES}, "
                f"got {self.num_micro_batches!r}"
            )
        if not _is_int(self.max_num_batched_tokens) or self.max_num_batched_tokens < 1:
            raise ValueError(
                "max_num_batched_tokens (--max-num-batched-tokens) must be a positive integer, "
                f"got {self.max_num_batched_tokens!r}"
            )
        if not isinstance(self.fp8_dispatch, bool):
            raise ValueError(f"fp8_dispatch must be True or False, got {self.fp8_dispatch!r}")
        if self.ffn_layout not in LAYOUTS:
            raise ValueError(
                f"ffn_layout (--ffn-layout) must be one of {', '.join(LAYOUTS)}, "
                f"got {self.ffn_layout!r}"
            )
        if not _is_int(self.ffn_instance_size) or self.ffn_instance_size < 1:
            raise ValueError(
                "ffn_instance_size (--gpus-per-ffn-instance) must be a positive integer, "
                f"got {self.ffn_instance_size!r}"
            )
        if self.ffn_instance_size > 1 and self.ffn_layout != SPLIT:
            raise ValueError(
                f"--gpus-per-ffn-instance {self.ffn_instance_size} takes --ffn-layout {SPLIT}: "
                "the processes of an FFN instance add up partial sums, which replicated MLPs "
                "do not make"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClusterConfig:
        """From `add_arguments`' flags; those not given take the defaults above."""
        given = {f.name: getattr(args, _DEST[f.name]) for f in fields(cls)}
        return cls(**{name: value for name, value in given.items() if value is not None})

    def check_unchanged(self, now: ClusterConfig) -> None:
        """Raises ClusterConfigChanged, naming what changed, unless `now` equals these."""
        changed = [
            f"{f.name} from {getattr(self, f.name)!r} to {getattr(now, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(now, f.name)
        ]
        if changed:
            raise ClusterConfigChanged(
                f"the cluster's {', '.join(changed)} (the controller restarted with other "
                "flags): this instance was built for the old values and stops; start it again"
            )


# Flag destinations, named as the command line names them.
_DEST = {
    "num_micro_batches": "micro_batches",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "fp8_dispatch": "fp8_dispatch",
    "ffn_layout": "ffn_layout",
    "ffn_instance_size": "gpus_per_ffn_instance",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that declare the cluster's facts: the controller's, and `afd serve`'s (which
    passes them on). Unset ones stay None, so a command can tell what was given."""
    defaults = ClusterConfig()
    parser.add_argument(
        "--micro-batches",
        type=int,
        metavar="K",
        help=f"micro-batches of the attention <-> FFN pipeline, 1 to {MAX_MICRO_BATCHES} "
        f"(default {defaults.num_micro_batches})",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        metavar="N",
        help="tokens an attention instance computes per step (the chunked-prefill budget; it "
        f"sizes the FFN instances' receive buffers; default {defaults.max_num_batched_tokens})",
    )
    parser.add_argument(
        "--fp8-dispatch",
        action="store_true",
        default=None,
        help="send activations to the FFN instances as FP8 (e4m3 + per-token scales)",
    )
    parser.add_argument(
        "--ffn-layout",
        choices=LAYOUTS,
        help="dense MLPs and the shared expert: split across FFN instances (partial sums) or "
        f"replicated on each (default {defaults.ffn_layout})",
    )
    parser.add_argument(
        "--gpus-per-ffn-instance",
        type=int,
        metavar="G",
        help="processes (one GPU each) per FFN instance: each attention instance sends a "
        "micro-batch to one of them, and they exchange it inside the instance (default "
        f"{defaults.ffn_instance_size})",
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
