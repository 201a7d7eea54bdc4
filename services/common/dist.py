"""Joining the torch.distributed group of one membership epoch.

The controller hosts the rendezvous store; each epoch gets its own key prefix, so a group
can be re-formed later without stale keys. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from services.common.cluster_secret import rendezvous_prefix
from services.common.control_client import Membership


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def join_group(
    membership: Membership,
    rank: int,
    device: torch.device,
    timeout_s: float,
    secret: str | None = None,
    rendezvous_timeout_s: float | None = None,
) -> dist.Store:
    """Initialise the default process group as `rank` of this epoch's world; returns the
    epoch's store, for barriers that must outlast the step timeout (see `wait_for_all`).

    `timeout_s` bounds each transfer (NCCL's watchdog enforces it; gloo transfers are waited
    for with their own timeout, see transport.py). `rendezvous_timeout_s` (default: the
    same) bounds the wait for every member to arrive: after a failure some take longer."""
    rendezvous_s = max(timeout_s, rendezvous_timeout_s or 0.0)
    store = dist.TCPStore(
        membership.store_host,
        membership.store_port,
        is_master=False,
        timeout=timedelta(seconds=rendezvous_s),
    )
    # Under a prefix only holders of the cluster secret can name (cluster_secret.py).
    prefixed = dist.PrefixStore(rendezvous_prefix(membership.epoch, secret), store)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # gloo takes the group's timeout for connecting to every peer; NCCL's watchdog takes it
    # for every operation, so there it stays the step timeout.
    group_s = timeout_s if device.type == "cuda" else rendezvous_s
    dist.init_process_group(
        backend_for(device),
        store=prefixed,
        rank=rank,
        world_size=membership.world_size,
        timeout=timedelta(seconds=group_s),
    )
    return prefixed


def wait_for_all(store: dist.Store, membership: Membership, rank: int, timeout_s: float) -> None:
    """Block until every member has called this: the step loop starts only once every
    instance has loaded its weights (which may take far longer than a step)."""
    store.set(f"ready/{rank}", "1")
    keys = [f"ready/{r}" for r in range(membership.world_size)]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except dist.DistStoreError as err:
        late = [f"rank {r}" for r, key in enumerate(keys) if not store.check([key])]
        raise TimeoutError(
            f"not every instance was ready within {timeout_s:g} s: waiting for {', '.join(late)}"
        ) from err


def peer_names(membership: Membership) -> dict[int, str]:
    """rank -> "attention instance 0" / "ffn instance 2" / "ffn instance 1 process 0", for
    error messages."""
    return {m.rank: membership.name_of(m) for m in membership.members}


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
