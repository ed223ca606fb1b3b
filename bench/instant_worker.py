"""A Celery worker for benchmarks: the real app, tasks and responder, with a model that
answers instantly, so what is measured is the pipeline around generation.

The test double goes into `worker.model._model` before the worker starts, so the worker's
own `get_model()` finds it (and prefork children inherit it through the fork). Production
code is untouched. With BENCH_STAGES set to a file path, each process appends one line per
task stage there: `<stage> <task id> <session> <time.time()>`, for the stages
`received` (the worker's main process took the message from the broker), `prerun` (a
pool thread or child starts the task), `generate` (the responder asks the model; logged
with the message id the benchmark put at the end of the text, after `#`, instead of the
session) and `postrun` (the task returned: reply delivered, lock released).

With BENCH_CELERY_TASK_LINES=1 or BENCH_SEPARATE_LOCK_AND_CLAIM=1 the worker undoes one
of the changes BENCHMARKS.md measures (`bench.pipeline_overhead --variant`), in this
process only. BENCH_KOMBU_TRANSPORT=1 does so for `common.broker`
(`bench.task_overhead --variant`).

    python -m bench.instant_worker worker --pool threads --concurrency 8
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from celery import current_task
from celery.signals import task_postrun, task_prerun, task_received

import worker.model
from bench.variants import lock_then_claim
from common.inbox import Inbox
from worker.app import SkipRoutineTaskLines, app
from worker.model import GeneratedReply

REPLY_TEXT = "Claro, te ayudo con eso."
_stages_path = os.environ.get("BENCH_STAGES")


def _stage(stage: str, task_id: str | None, session: object) -> None:
    if _stages_path:
        line = f"{stage} {task_id} {session} {time.time():.6f}\n".encode()
        fd = os.open(_stages_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write to an O_APPEND file: lines never interleave
        finally:
            os.close(fd)


class InstantModel:
    """What the worker uses of `ChatModel`: `name`, `device` and `reply(turns)`."""

    name = "bench-instant"
    device = "cpu"

    def reply(self, turns: Sequence[Any]) -> GeneratedReply:
        request = current_task.request if current_task else None
        # The benchmark ends each text with " #<message id>": log which one is answered.
        answered = turns[-1].content.rsplit("#", 1)[-1] if turns else "-"
        _stage("generate", getattr(request, "id", None), answered)
        return GeneratedReply(REPLY_TEXT, new_tokens=7, used_fallback=False)


@task_received.connect
def _received(request: Any = None, **_: Any) -> None:
    _stage("received", request.id, request.args[0] if request.args else "-")


@task_prerun.connect
def _prerun(task_id: str | None = None, args: Any = None, **_: Any) -> None:
    _stage("prerun", task_id, args[0] if args else "-")


@task_postrun.connect
def _postrun(task_id: str | None = None, args: Any = None, **_: Any) -> None:
    _stage("postrun", task_id, args[0] if args else "-")


def main(argv: Sequence[str]) -> None:
    worker.model._model = InstantModel()  # type: ignore[assignment]
    # No model files to look for before a prefork worker forks: the children inherit this.
    # (The module by name: the `worker` package's `app` attribute is the Celery app.)
    importlib.import_module("worker.app")._check_model_files = lambda: None
    if os.environ.get("BENCH_CELERY_TASK_LINES") == "1":  # experiment: undo worker.app's filter
        for name in ("celery.worker.strategy", "celery.app.trace"):
            logger = logging.getLogger(name)
            for found in [f for f in logger.filters if isinstance(f, SkipRoutineTaskLines)]:
                logger.removeFilter(found)
    if os.environ.get("BENCH_SEPARATE_LOCK_AND_CLAIM") == "1":  # experiment: as before
        Inbox.lock_and_claim = lock_then_claim  # type: ignore[method-assign]
    if os.environ.get("BENCH_KOMBU_TRANSPORT") == "1":  # experiment: kombu's own, as before
        app.conf.broker_transport = None
    app.worker_main(list(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
