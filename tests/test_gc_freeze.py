"""Both kinds of process keep their start-up objects out of the collector's full passes."""

from __future__ import annotations

import gc
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    yield
    gc.unfreeze()  # the test process goes on as it was


def collected_objects() -> int:
    """Objects a full pass would scan (the frozen ones are not among them)."""
    return len(gc.get_objects())


def test_a_worker_process_freezes_what_start_up_built(unfrozen: None) -> None:
    before = collected_objects()  # this process's modules stand for Celery and the model
    importlib.import_module("worker.app").freeze_startup_objects()
    assert gc.get_freeze_count() > 0
    assert collected_objects() < before / 10


def test_a_gunicorn_worker_freezes_the_loaded_app(unfrozen: None) -> None:
    namespace: dict[str, Any] = {}
    exec(compile((ROOT / "gunicorn.conf.py").read_text(), "gunicorn.conf.py", "exec"), namespace)
    before = collected_objects()
    namespace["post_worker_init"](None)  # gunicorn passes the worker; the hook ignores it
    assert gc.get_freeze_count() > 0
    assert collected_objects() < before / 10
