"""How the dense MLPs and shared experts are spread over the FFN instances (routed experts
are always divided). The layout is one of the cluster's facts, declared once on the
controller (services/common/cluster_config.py, where these names are defined); named here
for the FFN service's own modules."""

from services.common.cluster_config import LAYOUTS, REPLICATED, SPLIT

__all__ = ["LAYOUTS", "REPLICATED", "SPLIT"]
