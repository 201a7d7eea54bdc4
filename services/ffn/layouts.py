"""How the dense MLPs and shared experts are spread over the FFN instances (routed experts
are always divided). Torch-free, so the command line offers the choices without loading the
FFN service."""

SPLIT = "split"  # each instance holds a slice of every MLP's columns: partial sums
REPLICATED = "replicated"  # each holds whole MLPs, for the attention instances it serves
LAYOUTS = (SPLIT, REPLICATED)
