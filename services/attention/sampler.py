"""Picks each sequence's next token from its logits: presence and frequency penalties and
logit biases first, then greedy, or temperature with top-k and top-p filtering. Every request
draws from its own generator, so a seeded request gives the same tokens whatever else shares
its batch."""

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


def filter_rows(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """logits [M, V] float32, top_k [M] (0: off), top_p [M] (1: off) -> the same with each
    row's tokens outside its top-k, then outside its nucleus top-p, set to -inf.

    One sort for every row at once: at a 128K vocabulary, sorting row by row costs more than
    the rest of the step's sampling together. Top-k keeps the k first in sorted order; top-p
    then drops a token when the tokens before it already hold top_p of what top-k left (the
    first always stays).
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    positions = torch.arange(logits.shape[-1], device=logits.device)
    drop = (top_k[:, None] > 0) & (positions[None, :] >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # A top_p below float32's smallest normal reads as 0, which would drop the first token too.
    nucleus = top_p.clamp(min=torch.finfo(torch.float32).tiny)
    drop |= probs.cumsum(dim=-1) - probs >= nucleus[:, None]
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


def adjust_logits(
    logits: Tensor, params: list[SamplingParams], output_token_ids: list[list[int]] | None
) -> Tensor:
    """logits: [N, V] -> an adjusted copy (at least float32); `logits` itself is untouched.

    For each row and token j generated c_j times so far (OpenAI's definition):
    logits[j] -= presence_penalty * (c_j > 0) + frequency_penalty * c_j; then each biased
    token's logit += its bias. `output_token_ids`: None when no row has penalties.
    """
    adjusted = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)
    num_vocab = logits.shape[-1]
    for row, p in enumerate(params):
        generated = output_token_ids[row] if output_token_ids is not None else None
        if p.has_penalties and generated:
            ids = torch.tensor(generated, dtype=torch.long, device=logits.device)
            counts = torch.bincount(ids, minlength=num_vocab).to(adjusted.dtype)  # [V]
            present = (counts > 0).to(adjusted.dtype)  # [V]
            adjusted[row] -= p.presence_penalty * present + p.frequency_penalty * counts
        biased = [(token, bias) for token, bias in p.logit_bias if token < num_vocab]
        if biased:
            tokens, biases = zip(*biased, strict=True)
            index = torch.tensor(tokens, dtype=torch.long, device=logits.device)
            adjusted[row, index] += torch.tensor(biases, dtype=adjusted.dtype, device=logits.device)
    return adjusted


def sample(
    logits: Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    output_token_ids: list[list[int]] | None = None,
) -> list[int]:
    """logits: [N, V] -> one token id per row.

    output_token_ids: each row's generated tokens so far, needed only when some row has
    penalties; None (the common case) skips them. Logit biases apply whenever a row has them.

    Greedy rows take the argmax. The others are filtered and drawn together: a token is the
    argmax of p / e with e ~ Exp(1) per token, which picks token i with probability p_i (the
    exponential race), each row's noise from its own generator, so a seeded row gets the
    same token whatever else shares its batch. One read-back for the whole batch.
    """
    if output_token_ids is not None or any(p.logit_bias for p in params):
        logits = adjust_logits(logits, params, output_token_ids)
    tokens = logits.argmax(dim=-1)
    drawn = [row for row, p in enumerate(params) if not p.greedy]
    if drawn:
        device = logits.device
        rows = torch.tensor(drawn, device=device)
        chosen = [params[row] for row in drawn]
        temperature = torch.tensor([p.temperature for p in chosen], device=device)
        scaled = logits[rows].float() / temperature[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in chosen):
            top_k = torch.tensor([p.top_k for p in chosen], device=device)
            top_p = torch.tensor([p.top_p for p in chosen], device=device)
            scaled = filter_rows(scaled, top_k, top_p)
        probs = torch.softmax(scaled, dim=-1)
        noise = torch.empty_like(probs)
        for i, row in enumerate(drawn):
            noise[i].exponential_(generator=generators[row])
        # A draw of exactly 0 would make 0 / 0 = NaN, which argmax prefers: keep it positive.
        tokens[rows] = (probs / noise.clamp_(min=1e-30)).argmax(dim=-1)
    return tokens.tolist()


def token_logprobs(logits: Tensor, token_id: int, num_top: int) -> TokenLogprob:
    """logits: [V] -> the raw model distribution's logprob of `token_id` and its top n."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, num_top) if num_top else None
    pairs = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else ()
    return TokenLogprob(token_id, float(logprobs[token_id]), pairs)
