"""Micro-batching: concurrent requests in one process merged into one call of a batch function.

On a CPU, one decoding step of a transformer costs about the same for one sequence as for
sixteen: the time goes into reading the weights, not into the arithmetic. So when several
Celery threads of one worker process want a reply at the same moment, one batched
`generate` answers them all for little more than the price of one.

The batcher knows nothing about models: it takes items, runs `run_batch` on up to
`max_batch_size` of them from a single background thread, and hands each caller its own
result (or its own exception). Callers block in `submit` like they would on a direct call.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Request(Generic[Item, Result]):
    item: Item
    future: Future[Result] = field(default_factory=Future)


class MicroBatcher(Generic[Item, Result]):
    """Collects requests until none has come for `max_wait_seconds` (or a batch is full) and
    runs them.

    The wait only matters when the batcher is idle: while one batch runs, the requests that
    arrive queue up and form the next batch without further delay. A batch that raises is
    retried one item at a time, so one bad request cannot fail its neighbours.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[Item]], Sequence[Result]],
        *,
        max_batch_size: int,
        max_wait_seconds: float,
        name: str = "micro-batcher",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_seconds = max(0.0, max_wait_seconds)
        self._name = name
        self._requests: queue.SimpleQueue[_Request[Item, Result]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, item: Item) -> Result:
        """Run `item` in the next batch and return its result; blocks until it is ready."""
        if self.max_batch_size == 1:
            return self._run_batch([item])[0]  # nothing to merge: skip the thread hop
        self._ensure_thread()
        request: _Request[Item, Result] = _Request(item)
        self._requests.put(request)
        return request.future.result()

    def _ensure_thread(self) -> None:
        """Started on first use, so a prefork child starts its own thread after the fork."""
        if self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()

    def _serve(self) -> None:
        while True:
            batch = self._collect()
            self._run(batch)

    def _collect(self) -> list[_Request[Item, Result]]:
        """The next batch: every request that follows the previous one within the wait.

        The wait restarts with each request that joins, so a burst (a broadcast answered by
        many people, a worker catching up) leaves as one batch rather than as the few that
        came in the first few milliseconds followed by the rest a whole generation later.
        A batch leaves when it is full or when no request has come for `max_wait_seconds`,
        so the longest an idle batcher ever waits is `max_batch_size` times the wait.
        """
        batch = [self._requests.get()]
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._requests.get(timeout=self.max_wait_seconds))
            except queue.Empty:
                break
        return batch

    def _run(self, batch: list[_Request[Item, Result]]) -> None:
        try:
            results = self._run_batch([request.item for request in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} returned {len(results)} results")
        except BaseException as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            log.warning("batch of %d failed (%s); running its items one by one", len(batch), exc)
            for request in batch:
                self._run([request])
            return
        for request, result in zip(batch, results, strict=True):
            request.future.set_result(result)
