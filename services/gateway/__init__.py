"""The gateway: the OpenAI-compatible REST API, tokenisation and chat templates, and routing
of requests onto attention instances. It never imports torch.

Not built yet; `services.common.tokenizer` and `services.common.detokenizer` are its
torch-free building blocks.
"""
