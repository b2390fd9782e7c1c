"""Per-row sampling (components.model.sampling): each row's settings apply to that row only."""

from __future__ import annotations

import random

import torch

from components.model.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    process_and_sample,
    sample,
)


def test_inverse_transform_draws_follow_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log()[None].repeat(4000, 1)
    rng = random.Random(0)
    drawn = sample(logits, [SamplingParams()] * 4000, [rng.random() for _ in range(4000)])
    freq = torch.bincount(drawn, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_each_row_uses_its_own_settings():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]] * 4)
    params = [
        SamplingParams(temperature=0.0),  # greedy: token 1
        SamplingParams(top_k=1),  # only the top token survives
        SamplingParams(top_p=0.5),  # token 1 alone has 0.66 of the mass
        SamplingParams(min_p=0.9),
    ]  # nothing within 90% of the top
    for u in (0.0, 0.5, 0.999):
        assert sample(logits, params, [u] * 4).tolist() == [1, 1, 1, 1]
    free = sample(logits[:2], [SamplingParams()] * 2, [0.0, 0.999])
    assert free.tolist() == [0, 3]  # unfiltered: the draw reaches both ends


def test_seeded_draws_are_independent_of_the_batch():
    logits = torch.randn(3, 50)
    params = [
        SamplingParams(temperature=0.7),
        SamplingParams(top_p=0.8),
        SamplingParams(temperature=1.3),
    ]
    alone = sample(logits[1:2], params[1:2], [0.42])
    together = sample(logits, params, [0.1, 0.42, 0.9])
    assert together[1] == alone[0]


def test_openai_penalties_and_repetition_penalty():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    counts = torch.tensor([[3.0, 1.0, 0.0]])
    out = apply_penalties(
        logits, [SamplingParams(frequency_penalty=0.5, presence_penalty=1.0)], counts, None
    )
    assert torch.allclose(out, torch.tensor([[2.0 - 1.5 - 1.0, -1.0 - 0.5 - 1.0, 0.5]]))
    seen = torch.tensor([[True, True, False]])
    rep = apply_penalties(logits, [SamplingParams(repetition_penalty=2.0)], None, seen)
    assert torch.allclose(rep, torch.tensor([[1.0, -2.0, 0.5]]))


def test_logit_bias_forces_and_bans_per_row():
    logits = torch.zeros(2, 5)
    biased = apply_logit_bias(
        logits,
        [SamplingParams(logit_bias=((3, 100.0),)), SamplingParams(logit_bias=((0, -100.0),))],
    )
    assert biased[0, 3] == 100 and biased[1, 0] == -100 and biased[0, 0] == 0
    tokens = process_and_sample(
        logits,
        [SamplingParams(logit_bias=((3, 100.0),)), SamplingParams()],
        [0.5, 0.0],
        banned=[(), (0, 1)],
    )
    assert tokens[0] == 3 and tokens[1] not in (0, 1)
