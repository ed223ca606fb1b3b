"""JSON log lines name the Celery task they were written in, where the process asks."""

from __future__ import annotations

import json
import logging
import os

import pytest
from celery import Celery

from common.logging_setup import JsonFormatter, configure_logging


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


@pytest.fixture
def logging_switches():
    """The module-level switches `lean_records` turns off, at logging's defaults for the
    test (an app built by an earlier test turned them off for this process) and restored
    after it."""
    saved = (logging._srcfile, logging.logThreads, logging.logMultiprocessing)
    logging._srcfile = os.path.normcase(logging.addLevelName.__code__.co_filename)
    logging.logThreads = logging.logMultiprocessing = True
    root = logging.getLogger()
    level = root.level
    yield
    logging._srcfile, logging.logThreads, logging.logMultiprocessing = saved
    configure_logging(logging.getLevelName(level), "text")


def captured_record(logger_name: str) -> logging.LogRecord:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        logger.warning("a line")
    finally:
        logger.removeHandler(handler)
    return records[0]


def test_the_worker_keeps_the_caller_and_process_name_flower_and_celery_show(logging_switches):
    configure_logging("INFO", "json", task_ids=True)
    entry = captured_record("tests.worker-like")
    assert entry.funcName == "captured_record" and entry.lineno > 0
    assert entry.threadName is not None and entry.processName is not None


def test_the_webhook_skips_what_no_formatter_of_its_shows(logging_switches):
    configure_logging("INFO", "json", lean_records=True)
    entry = captured_record("tests.webhook-like")
    assert entry.lineno == 0 and entry.threadName is None and entry.processName is None
    line = json.loads(JsonFormatter().format(entry))
    assert line["event"] == "a line" and line["pid"] == entry.process
