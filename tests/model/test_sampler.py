"""The sampler: top-k and top-p keep exactly the tokens they should, row by row in one
batch; draws follow the filtered distribution; a seeded row draws the same whatever shares
its batch; greedy rows take the argmax."""

from __future__ import annotations

import torch

from services.attention.sampler import filter_rows, new_generator, sample
from services.common.sampling_params import SamplingParams


def kept_by_definition(row: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """The tokens a row keeps, one at a time in value order: the oracle."""
    order = sorted(range(row.numel()), key=lambda i: -row[i].item())
    if top_k:
        order = order[:top_k]
    probs = torch.softmax(row[order], dim=0).tolist()
    kept, held = [], 0.0
    for token, p in zip(order, probs, strict=True):
        if kept and held >= top_p:
            break
        kept.append(token)
        held += p
    return set(kept)


def test_each_row_keeps_its_own_top_k_then_top_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 2
    top_k = torch.tensor([0, 1, 5, 0, 20, 3])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.8, 0.3])
    filtered = filter_rows(logits, top_k, top_p)
    for r in range(6):
        kept = set(torch.nonzero(filtered[r] > float("-inf")).flatten().tolist())
        assert kept == kept_by_definition(logits[r], int(top_k[r]), float(top_p[r])), r
        assert torch.equal(filtered[r][list(kept)], logits[r][list(kept)])  # kept unchanged


def test_draws_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = [SamplingParams(temperature=1.0, top_p=0.9)]  # drops the 0.05 token
    generator = new_generator(7, torch.device("cpu"))
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[sample(logits, params, [generator])[0]] += 1
    assert counts[3] == 0
    expected = torch.tensor([0.5, 0.3, 0.15]) / 0.95
    assert torch.allclose(counts[:3] / 4000, expected, atol=0.03), counts


def test_a_seeded_row_draws_the_same_whatever_shares_its_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 200, generator=g)
    seeded = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=11)
    other = SamplingParams(temperature=1.3, seed=None)
    alone = sample(logits[:1], [seeded], [new_generator(11, torch.device("cpu"))])[0]
    gens = [new_generator(None, torch.device("cpu")), new_generator(11, torch.device("cpu"))]
    in_batch = sample(logits[[2, 0]], [other, seeded], gens)[1]
    assert in_batch == alone


def test_greedy_rows_take_the_argmax_beside_sampled_ones():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 100, generator=g)
    temperatures_and_top_k = ((0.0, 0), (1.0, 0), (0.7, 1), (2.0, 0))
    params = [SamplingParams(temperature=t, top_k=k) for t, k in temperatures_and_top_k]
    gens = [new_generator(i, torch.device("cpu")) for i in range(4)]
    tokens = sample(logits, params, gens)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    assert all(0 <= t < 100 for t in tokens)


def test_vanishing_temperature_or_top_p_pick_the_argmax_not_nothing():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 100, generator=g) * 3
    params = [SamplingParams(temperature=5e-324), SamplingParams(top_p=1e-300)]
    gens = [new_generator(i, torch.device("cpu")) for i in range(2)]
    assert sample(logits, params, gens) == logits.argmax(dim=-1).tolist()
