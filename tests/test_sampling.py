"""Drawing among the top-k gives transformers' temperature → top-k → top-p distribution."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from worker.sampling import SampleAmongTopK

VOCAB = 50257  # GPT-2's, where sorting and drawing over everything hurts
IDS = torch.zeros((8, 4), dtype=torch.long)


def transformers_probs(scores: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """What transformers' sampling draws from, in its own order of warpers."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k)])
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers(IDS[: len(scores)], scores.clone()).softmax(dim=-1)


def our_probs(scores: torch.Tensor, sampler: SampleAmongTopK) -> torch.Tensor:
    probs, positions = sampler.candidates(scores.clone())
    return torch.zeros_like(scores).scatter(-1, positions, probs)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(0.7, 50, 0.92), (1.0, 50, 0.5), (1.5, 5, 0.99), (0.3, 200, 0.3), (0.7, 50, 1.0)],
)
def test_same_distribution_as_transformers(temperature: float, top_k: int, top_p: float) -> None:
    torch.manual_seed(top_k)
    # Peaked and flat rows: the nucleus is then a handful of tokens or all k of them.
    scores = torch.randn(8, VOCAB) * torch.tensor([[0.5], [1], [2], [4], [8], [1], [3], [6]])

    expected = transformers_probs(scores, temperature, top_k, top_p)
    ours = our_probs(scores, SampleAmongTopK(temperature, top_k, top_p))

    torch.testing.assert_close(ours, expected)
    kept = (ours > 0).sum(dim=-1)
    assert kept.min() >= 1 and kept.max() <= top_k
    if top_p < 1:
        assert kept.min() < kept.max(), "rows of different shapes must keep different counts"


def test_temperature_comes_before_top_p() -> None:
    # Two tokens at 0.6 / 0.4: top-p 0.7 would keep both. Temperature 0.25 makes them
    # ~0.84 / ~0.16 first, and then the best alone reaches 0.7.
    scores = torch.log(torch.tensor([[0.6, 0.4] + [1e-9] * 8]))

    probs, positions = SampleAmongTopK(0.25, 5, 0.7).candidates(scores)

    assert positions[0, :2].tolist() == [0, 1]
    assert probs[0, 0] == 1.0 and probs[0, 1:].sum() == 0


@pytest.mark.parametrize("temperature", [1e-3, 1e-30, 1e-40])
def test_a_tiny_temperature_draws_the_best_token(temperature: float) -> None:
    # Scores divided by 1e-40 overflow float32 to inf, and the softmax of inf is NaN.
    scores = torch.tensor([[30.0, 29.5, 12.0, -4.0, 0.0, 1.0, 2.0, 3.0]])

    out = SampleAmongTopK(temperature, 5, 0.9)(IDS[:1], scores)

    assert out.argmax(dim=-1).item() == 0
    assert torch.isfinite(out).sum().item() == 1


def test_settings_refuse_a_temperature_that_overflows() -> None:
    from pydantic import ValidationError

    from common.settings import Settings

    with pytest.raises(ValidationError, match="temperature"):
        Settings(_env_file=None, temperature=1e-40)
    assert Settings(_env_file=None, temperature=0.01).temperature == 0.01


def test_draws_follow_the_distribution() -> None:
    torch.manual_seed(7)
    scores = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -9.0]]).repeat(4000, 1)
    sampler = SampleAmongTopK(0.8, 5, 0.9)

    out = sampler(IDS[:1].repeat(4000, 1), scores)

    assert torch.isfinite(out).sum(dim=-1).tolist() == [1] * 4000  # one token per row
    drawn = out.argmax(dim=-1)
    seen = torch.bincount(drawn, minlength=8).float() / len(drawn)
    expected = our_probs(scores[:1], sampler)[0]
    assert (seen - expected).abs().max() < 0.03, (seen, expected)
    assert seen[5:].sum() == 0  # beyond the top-k nothing is ever drawn


def test_a_token_transformers_banned_is_never_drawn() -> None:
    torch.manual_seed(3)
    scores = torch.zeros((500, 10))
    scores[:, 4] = -float("inf")  # as the minimum-length or no-repeat processors do

    drawn = SampleAmongTopK(1.0, 10, 1.0)(IDS[:1].repeat(500, 1), scores).argmax(dim=-1)

    assert 4 not in drawn.tolist()
    assert len(set(drawn.tolist())) == 9


def test_best_token_always_stays() -> None:
    scores = torch.full((1, 10), -10.0)
    scores[0, 3] = 50.0  # one token holds all the probability
    out = SampleAmongTopK(1.0, 5, 0.5)(IDS[:1], scores)
    assert torch.isfinite(out).nonzero().tolist() == [[0, 3]]


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(0.0, 5, 0.9), (0.7, 0, 0.9), (0.7, 5, 0.0), (1, 5, 1.5)]
)
def test_rejects_settings_it_cannot_apply(temperature: float, top_k: int, top_p: float) -> None:
    with pytest.raises(ValueError):
        SampleAmongTopK(temperature, top_k, top_p)
