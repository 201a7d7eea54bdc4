"""How a disaggregated attention instance gets back into a working cluster.

When a step fails because a peer died, or the heartbeat learns that the cluster moved on to
a newer epoch, the engine thread (see driver.py) calls `recover`: the instance reports
NOT_SERVING, leaves the broken group, registers again and waits (at most the recovery
timeout) for the next epoch to form, joins its group, and points the runner at it. The KV
cache and every request's state stay as they were.
"""

from __future__ import annotations

from services.attention.driver import DriverStopped, EngineDriver
from services.attention.remote_ffn import RemoteFFN
from services.common.control_client import ClusterShutdown, ControlError
from services.common.ffn_instances import door_ranks
from services.common.instance import Instance
from services.common.transport import PeerFailure
from services.common.wire.attention import SERVICE_NAME

# What a broken epoch looks like from a step: a peer failed a transfer, the controller said
# the epoch is over (EpochChanged is a ControlError), or the lockstep plan wait ran out.
BROKEN_EPOCH = (PeerFailure, ControlError, ConnectionError, TimeoutError)


class ClusterRecovery:
    def __init__(self, instance: Instance, ffn: RemoteFFN) -> None:
        self.instance = instance
        self.ffn = ffn
        self.driver: EngineDriver | None = None  # set once built

    def needed(self) -> bool:
        return self.instance.needs_rejoin()

    def recoverable(self, error: BaseException) -> bool:
        return isinstance(error, BROKEN_EPOCH)

    def recover(self, why: str) -> None:
        if self.instance.stopping.is_set() and (
            self.driver is None or self.driver.open_requests == 0
        ):
            # Stopping with nothing left to finish: rejoining would only hold up the stop
            # (and the peers' re-forming) until the recovery timeout.
            raise DriverStopped(f"{why}; this instance is stopping with no request left")
        server = self.instance.server
        server.set_serving(False, ("", SERVICE_NAME))
        try:
            # Not interrupted by SIGTERM: a draining instance still needs the cluster.
            membership, transport = self.instance.rejoin(why, interruptible=False)
        except ClusterShutdown as err:
            raise DriverStopped(f"the cluster is shutting down: {err}") from err
        num_attention = len(membership.attention_ranks)
        doors = door_ranks(membership, self.instance.rank)
        self.ffn.rebind(transport, membership.epoch, doors, num_attention)
        server.set_serving(True, ("", SERVICE_NAME))
