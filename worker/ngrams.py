"""No repeated n-grams in a reply, counted from each row's own first token.

transformers' `no_repeat_ngram_size` looks at every column of `input_ids`, and a batch
pads its shorter prompts on the left. DialoGPT has no padding token, so the padding is
its EOS, the same token that ends every turn: a padded row gains n-grams such as
(EOS, first, second) that the same prompt alone does not have, and a reply that starts
the way the conversation started is then steered away from a token it would otherwise
take. This processor bans what transformers' does, over the row's real tokens only, so
a batched reply stays the reply the conversation gets alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor


class NoRepeatNGramsAfterPadding(LogitsProcessor):
    """Ban every token that would repeat an n-gram already in the row's prompt or reply.

    `first_real` holds, per row, the column of its first token that is not padding; the
    n-grams starting before it are ignored. With no padding anywhere this bans exactly
    what `NoRepeatNGramLogitsProcessor` bans.
    """

    def __init__(self, ngram_size: int, first_real: Sequence[int]) -> None:
        if ngram_size < 1:
            raise ValueError(f"ngram_size must be at least 1, got {ngram_size}")
        self.ngram_size = ngram_size
        self.first_real = torch.tensor(list(first_real), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        n = self.ngram_size
        length = input_ids.shape[1]
        if length < n:
            return scores
        windows = input_ids.unfold(1, n, 1)  # (rows, length - n + 1, n): every n-gram
        if n == 1:
            repeats = torch.ones(windows.shape[:2], dtype=torch.bool, device=input_ids.device)
        else:
            newest = input_ids[:, length - n + 1 :]  # the n - 1 tokens the next one follows
            repeats = (windows[:, :, :-1] == newest[:, None, :]).all(dim=-1)
        starts = torch.arange(windows.shape[1], device=input_ids.device)
        repeats &= starts[None, :] >= self.first_real.to(input_ids.device)[:, None]
        row, start = repeats.nonzero(as_tuple=True)
        token = windows[row, start, -1]
        # An embedding table larger than the output layer has ids no score stands for.
        inside = token < scores.shape[-1]
        row, token = row[inside], token[inside]
        if row.numel() == 0:
            return scores
        banned = torch.zeros_like(scores, dtype=torch.bool)
        banned[row, token] = True
        return scores.masked_fill(banned, -float("inf"))
