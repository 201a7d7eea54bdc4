"""FFN instances: they hold the experts (and the dense and shared-expert MLPs) and run only
feed-forward math on the activations that attention instances send every layer.

Not built yet: the single-process engine runs the whole model in the attention service.
The expert math it will run is `services.common.model.moe.expert_forward`, which already
computes one shard's partial sum.
"""
