"""Prometheus in multi-process servers (gunicorn workers, Celery prefork children).

prometheus-client's multiprocess mode keeps each process's samples in files under one
directory that every process of the server shares, and the process that answers the
scrape merges them. The directory must be known before prometheus_client is imported and
be the same for the whole process tree, so the parent process sets it up.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_dir(role: str) -> str:
    """Use $PROMETHEUS_MULTIPROC_DIR or a fresh temporary one; empty it either way.

    Samples left by an earlier run would otherwise be merged into this one's.
    """
    path = os.environ.get(ENV) or tempfile.mkdtemp(prefix=f"{role}-metrics-")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    os.environ[ENV] = path
    return path


def ensure_multiprocess_dir(role: str) -> str:
    """Set $PROMETHEUS_MULTIPROC_DIR to a fresh temporary directory if it is unset.

    Called at import time of the worker app, before its metrics exist, so the prefork
    children inherit it. The directory made here is removed when the process that made
    it exits (`celery -A worker inspect ping`, a health check, imports the app too). A
    directory you set yourself is used as is: empty it when the worker starts.
    """
    if not os.environ.get(ENV):
        path = tempfile.mkdtemp(prefix=f"{role}-metrics-")
        os.environ[ENV] = path
        atexit.register(_remove_if_made_here, path, os.getpid())
    _switch_to_multiprocess_values()
    return os.environ[ENV]


def _switch_to_multiprocess_values() -> None:
    """Make metrics created from now on share their samples through the directory.

    prometheus_client picks in-process or file-backed values when it is first imported,
    and `celery` imports it before `-A worker`: the command loads its plugins first, and
    flower's imports prometheus_client. With in-process values every prefork child would
    count for itself and the scrape would read zeros.
    """
    values = sys.modules.get("prometheus_client.values")
    if values is not None and values.ValueClass is values.MutexValue:
        values.ValueClass = values.get_value_class()


def _remove_if_made_here(path: str, pid: int) -> None:
    if os.getpid() == pid:  # not in a forked child that inherited the exit hook
        shutil.rmtree(path, ignore_errors=True)


def registry_for_scrape():
    """A registry that merges every process's samples (or the default one otherwise)."""
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, values

    # The mode was fixed when prometheus_client was first imported, not by today's env.
    if values.ValueClass is values.MutexValue or not os.environ.get(ENV):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry
