"""The gateway: the OpenAI-compatible REST API, tokenisation and chat templates, and routing
of requests onto attention instances. It never imports torch.

`__main__` wires the parts: `protocol` (request bodies, pydantic at the edge only), `app`
(routes, keys, limits), `generation` (a request's choices as gRPC streams), `router` (load
polling, the admission queue), `admission` (the TPOT-steered concurrency limit),
`responses` (OpenAI's response and chunk shapes), `errors` (OpenAI's error shape).
"""
