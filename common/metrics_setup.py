"""Prometheus in multi-process servers (gunicorn workers, Celery prefork children).

prometheus-client's multiprocess mode keeps each process's samples in files under one
directory that every process of the server shares, and the process that answers the
scrape merges them. The directory must be known before prometheus_client is imported and
be the same for the whole process tree, so the parent process sets it up.
"""

from __future__ import annotations

import os
import shutil
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

    Called at import time of the worker app, before prometheus_client is imported, so
    the prefork children inherit it. A directory you set yourself is used as is: empty
    it when the worker starts.
    """
    if not os.environ.get(ENV):
        os.environ[ENV] = tempfile.mkdtemp(prefix=f"{role}-metrics-")
    return os.environ[ENV]


def registry_for_scrape():
    """A registry that merges every process's samples (or the default one otherwise)."""
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, values

    # The mode was fixed when prometheus_client was first imported, not by today's env.
    if values.ValueClass is values.MutexValue or not os.environ.get(ENV):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry
