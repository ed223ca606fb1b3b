"""Top-p among the top-k gives exactly what transformers' top-k then top-p gives."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from worker.sampling import TopPAmongTopK

VOCAB = 50257  # GPT-2's, where the full sort hurts


@pytest.mark.parametrize(("top_k", "top_p"), [(50, 0.92), (50, 0.5), (5, 0.99), (200, 0.3)])
def test_same_tokens_and_scores_as_transformers(top_k: int, top_p: float) -> None:
    torch.manual_seed(top_k)
    # Peaked and flat rows: the nucleus is then a handful of tokens or all k of them.
    scores = torch.randn(8, VOCAB) * torch.tensor([[0.5], [1], [2], [4], [8], [1], [3], [6]])
    ids = torch.zeros((8, 4), dtype=torch.long)

    after_top_k = TopKLogitsWarper(top_k)(ids, scores.clone())
    expected = TopPLogitsWarper(top_p)(ids, after_top_k.clone())
    ours = TopPAmongTopK(top_p, top_k)(ids, after_top_k.clone())

    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    assert torch.equal(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)])
    kept = (~torch.isinf(ours)).sum(dim=-1)
    assert kept.min() >= 1 and kept.max() <= top_k
    assert kept.min() < kept.max(), "rows of different shapes must keep different counts"


def test_best_token_always_stays() -> None:
    scores = torch.full((1, 10), -10.0)
    scores[0, 3] = 50.0  # one token holds all the probability
    ours = TopPAmongTopK(0.5, 5)(torch.zeros((1, 1), dtype=torch.long), scores)
    assert (~torch.isinf(ours)).nonzero().tolist() == [[0, 3]]


@pytest.mark.parametrize(("top_p", "top_k"), [(0.0, 5), (1.0, 5), (0.9, 0)])
def test_rejects_settings_it_does_not_apply_to(top_p: float, top_k: int) -> None:
    with pytest.raises(ValueError):
        TopPAmongTopK(top_p, top_k)
