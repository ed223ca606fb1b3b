"""One log format for both processes, set up once.

JSON lines (one object per line: time, level, logger, event, pid, and in the worker the
Celery task id inside a task) for log shippers in production; a readable line in
development.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Literal

from celery import current_task

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
# json.dumps builds a new encoder for every call with a non-default option.
_ENCODE = json.JSONEncoder(ensure_ascii=False).encode


def _task_id() -> str | None:
    # A proxy to the task this thread runs (false outside a task): looked up on every line.
    if not current_task:
        return None
    return getattr(getattr(current_task, "request", None), "id", None)


class JsonFormatter(logging.Formatter):
    def __init__(self, task_ids: bool = False) -> None:
        super().__init__()
        self._task_ids = task_ids  # the webhook runs no tasks: no lookup on its every line

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            "pid": record.process,
        }
        if self._task_ids and (task_id := _task_id()) is not None:
            entry["task_id"] = task_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _ENCODE(entry)


def configure_logging(
    level: str,
    fmt: Literal["json", "text"] = "text",
    *,
    task_ids: bool = False,
    lean_records: bool = False,
) -> None:
    """Idempotent: gunicorn workers and Celery children may call it more than once.

    `task_ids`: JSON lines name the Celery task they were written in (the worker).
    `lean_records`: records skip looking up the caller's file and line, the thread and the
    multiprocessing process name (the Logging HOWTO's "Optimization"; 2.3% of a webhook
    request's instructions). Only where no formatter shows them: our formats and
    gunicorn's do not, but flower's shows the caller's module and line and Celery's the
    process name, and both run in the processes that import the worker.
    """
    if lean_records:
        logging._srcfile = None
        logging.logThreads = False
        logging.logMultiprocessing = False
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_whatsapp_reply", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler._whatsapp_reply = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    formatter = JsonFormatter(task_ids) if fmt == "json" else logging.Formatter(_TEXT_FORMAT)
    handler.setFormatter(formatter)
    root.setLevel(level)
