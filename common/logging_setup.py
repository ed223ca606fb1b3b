"""One log format for both processes, set up once.

JSON lines (one object per line: time, level, logger, event, pid, and the Celery task id
inside a task) for log shippers in production; a readable line in development.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Literal

from celery import current_task

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"


def _task_id() -> str | None:
    # A proxy to the task this thread runs (false outside a task): looked up on every line.
    if not current_task:
        return None
    return getattr(getattr(current_task, "request", None), "id", None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            "pid": record.process,
        }
        if (task_id := _task_id()) is not None:
            entry["task_id"] = task_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, fmt: Literal["json", "text"] = "text") -> None:
    """Idempotent: gunicorn workers and Celery children may call it more than once."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_whatsapp_reply", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler._whatsapp_reply = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    root.setLevel(level)
