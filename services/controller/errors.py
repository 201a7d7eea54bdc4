"""How the controller's domain says no. Plain exceptions; `server.py` maps them to gRPC codes."""


class Refused(Exception):
    """The request does not fit the cluster; the message says why and what to do."""


class Conflict(Refused):
    """The place is taken: an index registered from another address, a step's plan changed."""


class StaleEpoch(Refused):
    """The request names an epoch that is over: the member must register again."""


class ShuttingDown(Exception):
    """The cluster is stopping; whoever waits should stop too."""
