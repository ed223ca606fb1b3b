"""The worker's log keeps one line per reply: Celery's routine per-task lines are dropped."""

from __future__ import annotations

import logging

from celery.app import trace

from worker.app import SkipRoutineTaskLines


def record(msg: str) -> logging.LogRecord:
    context = {"id": "t1", "name": "worker.reply_to_session", "args": "['+591****0001']",
               "kwargs": "{}", "eta": None, "return_value": 1, "runtime": 0.01,
               "exc": "boom"}  # fmt: skip
    return logging.LogRecord("celery.app.trace", logging.INFO, __file__, 1, msg, (context,), None)


def test_received_and_succeeded_lines_are_dropped():
    skip = SkipRoutineTaskLines()
    assert not skip.filter(record(trace.LOG_RECEIVED))
    assert not skip.filter(record(trace.LOG_SUCCESS))


def test_retries_and_failures_still_log():
    skip = SkipRoutineTaskLines()
    for msg in (trace.LOG_RETRY, trace.LOG_FAILURE, "Task %(name)s[%(id)s] rejected"):
        assert skip.filter(record(msg))
