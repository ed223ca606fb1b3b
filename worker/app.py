"""The worker's Celery app: shared configuration, tasks, the heartbeat, model warm-up."""

from __future__ import annotations

import logging
import os
from typing import Any, NoReturn

from celery.app import trace
from celery.signals import worker_init, worker_process_init, worker_process_shutdown

from common.heap import freeze_startup_objects
from common.logging_setup import configure_logging
from common.metrics_setup import ensure_multiprocess_dir
from common.queue import make_celery
from common.settings import get_settings

settings = get_settings()
configure_logging(settings.log_level, settings.effective_log_format, task_ids=True)
if settings.worker_metrics_port:
    ensure_multiprocess_dir("worker")  # before anything imports prometheus_client

from worker.bootsteps import Heartbeat, RecoverySweep  # noqa: E402

log = logging.getLogger(__name__)


class SkipRoutineTaskLines(logging.Filter):
    """One line per reply, as the webhook writes one per request.

    The responder's `replied …` line already says what Celery's "Task … received" and
    "Task … succeeded" lines would; this drops those two before they are formatted, while
    retries and failures still reach the log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        # Celery logs these with its own format strings: identity is the exact test.
        return record.msg is not trace.LOG_RECEIVED and record.msg is not trace.LOG_SUCCESS


def _skip_routine_task_lines() -> None:
    if logging.getLevelName(settings.log_level) > logging.DEBUG:  # DEBUG keeps everything
        for name in ("celery.worker.strategy", "celery.app.trace"):
            logging.getLogger(name).addFilter(SkipRoutineTaskLines())


_skip_routine_task_lines()
app = make_celery(settings)
app.conf.include = ["worker.tasks"]
app.steps["worker"].update({Heartbeat, RecoverySweep})


# The worker's exit status when it cannot load its model (see `_stop_without_model`).
EXIT_NO_MODEL = 3


def _stop_without_model(exc: Exception) -> NoReturn:
    """A worker without its model would still look healthy (heartbeat, flower, /ready)
    while every reply task failed and was retried; stop it with a clear line instead."""
    log.critical("cannot load MODEL_NAME=%r, stopping the worker: %s", settings.model_name, exc)
    raise SystemExit(EXIT_NO_MODEL) from exc


def _load_model() -> None:
    from worker.model import get_model

    try:
        get_model()
    except Exception as exc:
        _stop_without_model(exc)
    freeze_startup_objects()


def _check_model_files() -> None:
    """Prefork parent: a prefork child that cannot load the model exits and is replaced,
    in a loop, so find the model's files before forking (a wrong MODEL_NAME, a hub out of
    reach). Only the config, and without importing torch: each child must import it
    after the fork, with its share of the cores."""
    from transformers.utils import cached_file

    try:
        cached_file(settings.model_name, "config.json")
    except Exception as exc:
        _stop_without_model(exc)


@worker_process_init.connect
def _load_model_in_child(**_: Any) -> None:
    """Prefork: each child loads the model once, before it takes its first task."""
    _load_model()


@worker_process_shutdown.connect
def _forget_child_metrics(pid: int | None = None, **_: Any) -> None:
    if settings.worker_metrics_port:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


@worker_init.connect
def _start_worker(sender: Any = None, **_: Any) -> None:
    """Serve metrics; with solo or thread pools, load the model here, once."""
    if settings.worker_metrics_port:
        from worker.metrics import serve

        serve(settings)
    pool = getattr(sender, "pool_cls", None)
    pool_name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if "prefork" in str(pool_name):
        _check_model_files()
        _share_cores_among_children(int(getattr(sender, "concurrency", 1) or 1))
        freeze_startup_objects()  # before the fork: children share these pages untouched
    else:
        _load_model()


def _share_cores_among_children(children: int) -> None:
    """Give each prefork child its share of the cores (read back by worker.model).

    Set in the parent before the fork, through the variable torch itself reads, unless
    the operator chose a number (TORCH_THREADS or OMP_NUM_THREADS).
    """
    if settings.torch_threads or os.environ.get("OMP_NUM_THREADS"):
        return
    share = max(1, (os.cpu_count() or 1) // max(1, children))
    os.environ["OMP_NUM_THREADS"] = str(share)
    log.info("torch threads per child: %d (%d children)", share, children)
