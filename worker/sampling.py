"""Sampling the next token among the top-k candidates only.

transformers works over the whole vocabulary at every decoding step: top-p sorts all
scores, and `torch.multinomial` draws from all probabilities (its CPU kernel alone took
23-25 ms for 16 rows of GPT-2's 50257 tokens). Its sampling took 53 ms per step at a
batch of 16 on the slower 2-core benchmark machine, this one 3 ms (`python -m
bench.sampling`). Once top-k has spoken only k tokens can be drawn, so the same
distribution comes from the k best scores: temperature, top-k, top-p among those k, then
a draw among them.

The processor returns scores in which only the drawn token is finite, and the model
generates with `do_sample=False`: transformers' greedy step (an argmax) then takes exactly
the token drawn here. transformers runs custom processors after its own (repetition
penalty, no-repeat n-grams, minimum length) and before its sampling warpers, which this
replaces: with its temperature warper also on, top-p would be measured on the scores
before temperature, not after as transformers' own order does.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class SampleAmongTopK(LogitsProcessor):
    """Draw one token per row as transformers' temperature → top-k → top-p sampling would.

    Only the drawn token keeps a finite score (0), so a following argmax picks it. Top-p
    keeps the smallest set of the best tokens whose probability reaches `top_p` (all k
    with `top_p` = 1); the best token always stays.
    """

    def __init__(self, temperature: float, top_k: int, top_p: float = 1.0) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be above 0, got {temperature}")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p

    def candidates(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's probabilities over its k best tokens (0 for those top-p drops) and
        those tokens' ids, best first."""
        k = min(self.top_k, scores.shape[-1])
        best, positions = scores.topk(k, dim=-1)  # temperature does not change the order
        # Scores relative to the best one: a small temperature cannot overflow them.
        best = best.float()
        probs = ((best - best[..., :1]) / self.temperature).softmax(dim=-1)
        if self.top_p < 1:
            above = probs.cumsum(dim=-1) - probs  # probability held by better-ranked tokens
            drop = above >= self.top_p
            drop[..., 0] = False
            probs = probs.masked_fill(drop, 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs, positions

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs, positions = self.candidates(scores)
        drawn = positions.gather(-1, torch.multinomial(probs, num_samples=1))
        return torch.full_like(scores, -float("inf")).scatter_(-1, drawn, 0.0)
