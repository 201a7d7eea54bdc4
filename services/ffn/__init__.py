"""FFN instances: they hold a shard of the feed-forward (an expert range and the dense and
shared-expert MLPs, or a slice of them) and run only feed-forward math on the activations
that attention instances send every layer.

The math is the FFN half's (`services.common.model.ffn_half`), built by
`build.build_ffn_half`, which also chooses its FP8 form and its kernels; a shard's output is
its partial sum.
"""
