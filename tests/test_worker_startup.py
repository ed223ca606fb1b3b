"""A worker that cannot load its model stops at start-up, with a line that says why.

Otherwise it would look healthy (heartbeat, flower, /ready) while every reply task failed
and was retried. Real `celery -A worker worker` processes, both pools.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
import redis

from common.keys import worker_heartbeat_pattern
from tests.processes import celery_worker_command, process_env
from worker.app import EXIT_NO_MODEL


@pytest.mark.parametrize("pool", ["threads", "prefork"])
@pytest.mark.parametrize("model", ["missing-directory", "no-such-org/no-such-model"])
def test_a_worker_without_its_model_exits_before_it_is_ready(
    redis_url: str, tmp_path: Path, pool: str, model: str
) -> None:
    unique = uuid.uuid4().hex[:10]
    prefix = f"startup-{unique}"
    name = str(tmp_path / model) if model == "missing-directory" else model
    env = process_env(
        {
            "REDIS_URL": redis_url,
            "KEY_PREFIX": prefix,
            "TASK_QUEUE": f"startup-queue-{unique}",
            "MODEL_NAME": name,
            "WORKER_METRICS_PORT": "0",
            "LOG_LEVEL": "INFO",
            "LOG_FORMAT": "text",
        }
    )
    command = celery_worker_command(f"startup-{unique}", concurrency=2, pool=pool)

    finished = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )

    log = finished.stdout + finished.stderr
    assert finished.returncode == EXIT_NO_MODEL, log[-3000:]
    assert "CRITICAL" in log and f"cannot load MODEL_NAME={name!r}" in log, log[-3000:]
    assert "ready." not in log  # it never took a task
    client = redis.Redis.from_url(redis_url)
    try:
        assert not list(client.scan_iter(match=worker_heartbeat_pattern(prefix)))
    finally:
        client.close()
