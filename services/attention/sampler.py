"""Picks each sequence's next token from its logits: presence and frequency penalties first,
then greedy, or temperature with top-k and top-p filtering. Every request draws from its own
generator, so a seeded request gives the same tokens whatever else shares its batch."""

from __future__ import annotations

import torch
from torch import Tensor

from services.common.logprobs import TokenLogprob
from services.common.sampling_params import SamplingParams


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """logits: [V] float32 -> the same with tokens outside top-k / nucleus top-p set to -inf."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already hold top_p; the first always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def apply_penalties(
    logits: Tensor, params: list[SamplingParams], output_token_ids: list[list[int]]
) -> Tensor:
    """logits: [N, V] -> a penalised copy (at least float32); `logits` itself is untouched.

    For each row and token j generated c_j times so far (OpenAI's definition):
    logits[j] -= presence_penalty * (c_j > 0) + frequency_penalty * c_j.
    """
    penalised = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)
    num_vocab = logits.shape[-1]
    for row, (p, generated) in enumerate(zip(params, output_token_ids, strict=True)):
        if not p.has_penalties or not generated:
            continue
        ids = torch.tensor(generated, dtype=torch.long, device=logits.device)
        counts = torch.bincount(ids, minlength=num_vocab).to(penalised.dtype)  # [V]
        present = (counts > 0).to(penalised.dtype)  # [V]
        penalised[row] -= p.presence_penalty * present + p.frequency_penalty * counts
    return penalised


def sample(
    logits: Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    output_token_ids: list[list[int]] | None = None,
) -> list[int]:
    """logits: [N, V] -> one token id per row.

    output_token_ids: each row's generated tokens so far, needed only when some row has
    penalties; None (the common case) skips them at no cost.
    """
    if output_token_ids is not None:
        logits = apply_penalties(logits, params, output_token_ids)
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            tokens.append(greedy[row])
            continue
        filtered = filter_logits(logits[row].float() / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(filtered, dim=-1)
        tokens.append(int(torch.multinomial(probs, 1, generator=generator)))
    return tokens


def token_logprobs(logits: Tensor, token_id: int, num_top: int) -> TokenLogprob:
    """logits: [V] -> the raw model distribution's logprob of `token_id` and its top n."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, num_top) if num_top else None
    pairs = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else ()
    return TokenLogprob(token_id, float(logprobs[token_id]), pairs)
