"""JSON log lines name the Celery task they were written in, where the process asks."""

from __future__ import annotations

import json
import logging

import pytest
from celery import Celery

from common.logging_setup import JsonFormatter


def record(message: str = "replied to=+591****5678") -> logging.LogRecord:
    return logging.LogRecord("worker.responder", logging.INFO, __file__, 1, message, None, None)


def formatted_inside_a_task(formatter: JsonFormatter) -> tuple[dict, str]:
    app = Celery("logging-test", set_as_current=False)

    @app.task(bind=True, shared=False)  # kept off the registry other tests' apps share
    def log_a_line(self) -> str:
        return formatter.format(record())

    result = log_a_line.apply()
    return json.loads(result.get()), result.id


def test_a_worker_line_written_in_a_task_names_the_task():
    entry, task_id = formatted_inside_a_task(JsonFormatter(task_ids=True))
    assert entry["task_id"] == task_id
    assert entry["event"] == "replied to=+591****5678"


@pytest.mark.parametrize("task_ids", [True, False])
def test_a_line_outside_any_task_has_no_task_id(task_ids):
    entry = json.loads(JsonFormatter(task_ids=task_ids).format(record()))
    assert "task_id" not in entry
    assert {"time", "level", "logger", "event", "pid"} <= set(entry)


def test_the_webhook_formatter_does_not_look_for_a_task():
    entry, _ = formatted_inside_a_task(JsonFormatter(task_ids=False))
    assert "task_id" not in entry
