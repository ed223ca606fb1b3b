"""Micro-batching: the batcher's merging rules, and batched generation equal to unbatched."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from common.settings import Settings
from tests.fixtures_model import tiny_chat_model_dir, tiny_model_dir  # noqa: F401
from worker.batching import MicroBatcher
from worker.context import Turn
from worker.model import ChatModel

# Conversations of different lengths, so that rows of one batch need different padding.
CONVERSATIONS = [
    [Turn("user", "hi")],
    [Turn("user", "Where is my order? " * 3)],
    [Turn("user", "Hola"), Turn("assistant", "¿En qué te ayudo?"), Turn("user", "mi pedido")],
    [Turn("user", "one"), Turn("assistant", "two"), Turn("user", "three four five six seven")],
    [Turn("user", "Can I change the delivery address after paying?")],
    # The tiny model's reply repeats the opening (" dí") right after a turn's EOS, which
    # is also the padding: counted over the padding, (EOS, dí, dí) would ban a token.
    [
        Turn("user", " dí dí"),
        Turn("assistant", "Sure, what time?"),
        Turn("user", "Can I pay by card?"),
    ],
]


class RecordingBatch:
    """A batch function that squares numbers, records batch sizes and can be told to fail."""

    def __init__(self, delay: float = 0.0, poison: int | None = None) -> None:
        self.sizes: list[int] = []
        self.threads: set[str] = set()
        self.delay = delay
        self.poison = poison
        self.lock = threading.Lock()

    def __call__(self, items: Sequence[int]) -> list[int]:
        with self.lock:
            self.sizes.append(len(items))
            self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if self.poison is not None and self.poison in items:
            raise ValueError(f"cannot square {self.poison}")
        return [item * item for item in items]


def submit_all(batcher: MicroBatcher[int, int], items: Sequence[int]) -> list[Any]:
    """Submit every item from its own thread at once; each result or exception, in order."""

    def one(item: int) -> Any:
        try:
            return batcher.submit(item)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(one, items))


# --- the batcher ---------------------------------------------------------------------------


def test_concurrent_requests_share_batches_and_get_their_own_results() -> None:
    run = RecordingBatch(delay=0.05)
    batcher = MicroBatcher(run, max_batch_size=8, max_wait_seconds=0.2)

    results = submit_all(batcher, list(range(16)))

    assert results == [item * item for item in range(16)]
    assert sum(run.sizes) == 16
    assert max(run.sizes) <= 8
    assert len(run.sizes) < 16, f"requests were not merged: batch sizes {run.sizes}"
    assert run.threads == {"micro-batcher"}


def test_a_lone_request_waits_at_most_max_wait() -> None:
    run = RecordingBatch()
    batcher = MicroBatcher(run, max_batch_size=8, max_wait_seconds=0.01)

    assert batcher.submit(3) == 9
    assert batcher.submit(4) == 16
    assert run.sizes == [1, 1]


def submit_spaced(batcher: MicroBatcher[int, int], items: Sequence[int], gap: float) -> list[int]:
    """Submit each item from its own thread, `gap` seconds after the previous one."""
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        futures = []
        for item in items:
            futures.append(pool.submit(batcher.submit, item))
            time.sleep(gap)
        return [future.result() for future in futures]


def test_a_burst_longer_than_the_wait_leaves_as_one_batch() -> None:
    """Each arrival restarts the wait: six requests 0.1 s apart span 0.5 s, longer than the
    0.3 s wait, and still form one batch (a wait counted from the first would split it)."""
    run = RecordingBatch()
    batcher = MicroBatcher(run, max_batch_size=8, max_wait_seconds=0.3)

    assert submit_spaced(batcher, list(range(6)), gap=0.1) == [n * n for n in range(6)]
    assert run.sizes == [6]


def test_a_full_batch_leaves_without_waiting_for_the_rest_of_the_burst() -> None:
    run = RecordingBatch()
    batcher = MicroBatcher(run, max_batch_size=3, max_wait_seconds=0.3)

    assert submit_spaced(batcher, list(range(5)), gap=0.05) == [n * n for n in range(5)]
    assert run.sizes == [3, 2]


def test_a_pause_longer_than_the_wait_ends_the_batch() -> None:
    run = RecordingBatch()
    batcher = MicroBatcher(run, max_batch_size=8, max_wait_seconds=0.05)

    assert submit_spaced(batcher, [1, 2], gap=0.5) == [1, 4]
    assert run.sizes == [1, 1]


def test_batch_size_one_runs_in_the_callers_thread() -> None:
    run = RecordingBatch()
    batcher = MicroBatcher(run, max_batch_size=1, max_wait_seconds=1.0)

    assert submit_all(batcher, [1, 2, 3]) == [1, 4, 9]
    assert run.sizes == [1, 1, 1]
    assert "micro-batcher" not in run.threads


def test_a_failing_item_fails_alone() -> None:
    run = RecordingBatch(delay=0.05, poison=5)
    batcher = MicroBatcher(run, max_batch_size=8, max_wait_seconds=0.2)

    results = submit_all(batcher, [1, 5, 7, 9])

    assert isinstance(results[1], ValueError)
    assert "cannot square 5" in str(results[1])
    assert [results[0], results[2], results[3]] == [1, 49, 81]


def test_a_wrong_number_of_results_is_an_error_not_a_mixup() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(
        lambda items: [0], max_batch_size=4, max_wait_seconds=0.2
    )
    results = submit_all(batcher, [1, 2])
    # Merged, the batch returns one result for two items; alone, each gets its own.
    assert results == [0, 0]


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        MicroBatcher(lambda items: list(items), max_batch_size=0, max_wait_seconds=0)


# --- batched generation --------------------------------------------------------------------


def greedy_model(model_dir: Path, batch_size: int) -> ChatModel:
    settings = Settings(
        _env_file=None,
        model_name=str(model_dir),
        device="cpu",
        do_sample=False,
        max_new_tokens=12,
        min_new_tokens=8,  # the tiny model would often stop at once; make replies say something
        generation_batch_size=batch_size,
        generation_batch_wait_ms=200,
    )
    return ChatModel.load(settings)


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_chat_model_dir"])
def test_batched_generation_equals_unbatched(
    model_fixture: str, request: pytest.FixtureRequest
) -> None:
    model = greedy_model(request.getfixturevalue(model_fixture), batch_size=8)
    prompts = [model.prompt_ids(turns) for turns in CONVERSATIONS]
    assert len({len(prompt) for prompt in prompts}) > 1, "prompts must need padding"

    alone = [model.generate_batch([prompt])[0] for prompt in prompts]
    together = model.generate_batch(prompts)

    assert together == alone
    assert len({tuple(ids) for ids in alone}) > 1, "replies must differ to catch a row mix-up"


def test_concurrent_replies_are_batched_and_match_unbatched(
    tiny_model_dir: Path,  # noqa: F811
) -> None:
    batched = greedy_model(tiny_model_dir, batch_size=8)
    unbatched = greedy_model(tiny_model_dir, batch_size=1)
    sizes: list[int] = []
    real = batched.generate_batch

    def spy(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        sizes.append(len(prompts))
        return real(prompts)

    batched._batcher._run_batch = spy  # observe the batcher, keep the real generation

    with ThreadPoolExecutor(max_workers=len(CONVERSATIONS)) as pool:
        replies = list(pool.map(batched.reply, CONVERSATIONS))

    assert replies == [unbatched.reply(turns) for turns in CONVERSATIONS]
    assert sum(sizes) == len(CONVERSATIONS)
    assert max(sizes) > 1, f"no batch was merged: {sizes}"


def test_rows_that_stop_early_are_cut_at_their_eos(tiny_model_dir: Path) -> None:  # noqa: F811
    model = greedy_model(tiny_model_dir, batch_size=8)
    eos = model.tokenizer.eos_token_id
    assert model._until_eos([5, 6, eos, eos, eos]) == [5, 6, eos]
    assert model._until_eos([5, 6, 7]) == [5, 6, 7]
