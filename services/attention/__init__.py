"""Attention instances: the KV cache, the scheduler and the engine that drives the model.

Today the engine runs the whole model in one process (`Engine`); in the disaggregated
runtime the same engine keeps attention, the router, the LM head and sampling here and sends
each layer's feed-forward work to the FFN instances.
"""
