"""No repeated n-grams: transformers' rule, counted from each row's first real token."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from worker.ngrams import NoRepeatNGramsAfterPadding

VOCAB = 12
PAD = 0  # DialoGPT pads with its EOS, the token that also ends every turn


def scores_after(processor, rows: list[list[int]]) -> torch.Tensor:
    return processor(torch.tensor(rows), torch.zeros(len(rows), VOCAB))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_without_padding_it_bans_what_transformers_bans(n: int) -> None:
    generator = torch.Generator().manual_seed(n)
    rows = torch.randint(0, 3, (6, 24), generator=generator).tolist()  # few ids: many repeats

    ours = scores_after(NoRepeatNGramsAfterPadding(n, [0] * len(rows)), rows)
    theirs = scores_after(NoRepeatNGramLogitsProcessor(n), rows)

    assert torch.equal(ours, theirs)
    assert torch.isinf(ours).any(), "the sample had no repeat to ban"


@pytest.mark.parametrize(
    ("n", "alone"),
    [
        # A turn just ended (0): padding with that same 0 adds (0, 0) and (0, 3).
        (2, [3, 4, 5, 0, 7, 0]),
        # The reply starts as the conversation did (3, ...) right after a turn's EOS (0):
        # padding makes (0, 3, 4) look like an earlier 3-gram.
        (3, [3, 4, 5, 0, 7, 0, 3]),
    ],
)
def test_a_padded_row_is_banned_as_it_would_be_alone(n: int, alone: list[int]) -> None:
    padded = [PAD, PAD, PAD, *alone]

    expected = scores_after(NoRepeatNGramLogitsProcessor(n), [alone])
    ours = scores_after(NoRepeatNGramsAfterPadding(n, [3, 0]), [padded, [*alone, 9, 9, 9]])
    naive = scores_after(NoRepeatNGramLogitsProcessor(n), [padded])

    assert torch.equal(ours[0], expected[0])
    assert not torch.equal(naive[0], expected[0]), "padding no longer adds n-grams here"


def test_rows_shorter_than_the_ngram_are_left_alone() -> None:
    processor = NoRepeatNGramsAfterPadding(3, [3])
    scores = scores_after(processor, [[PAD, PAD, PAD, 5, 5]])
    assert not torch.isinf(scores).any()


def test_ids_beyond_the_output_layer_are_ignored() -> None:
    # An embedding table larger than the output layer: id 9 has no score to ban.
    scores = NoRepeatNGramsAfterPadding(2, [0])(torch.tensor([[1, 9, 1]]), torch.zeros(1, 5))
    assert not torch.isinf(scores).any()


def test_the_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        NoRepeatNGramsAfterPadding(0, [0])
