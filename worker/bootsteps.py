"""Work the worker's main process does on a timer, beside consuming tasks.

- Heartbeat: a short-lived key per worker, so `/ready` can say whether one is alive.
- Recovery sweep: re-queue work whose task was lost (see worker.recovery); one worker
  per interval runs it, chosen by a Redis key set with NX.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any

import redis
from celery import bootsteps

from common.keys import sweeper_lock, worker_heartbeat
from common.redis_client import connect
from common.settings import Settings, get_settings

log = logging.getLogger(__name__)


class _TimerStep(bootsteps.StartStopStep):
    """Runs `tick` at start and every `interval(settings)` seconds on the worker's timer."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._timer_ref: Any = None
        self.client: redis.Redis | None = None

    def interval(self, settings: Settings) -> float:
        raise NotImplementedError

    def tick(self) -> None:
        raise NotImplementedError

    def start(self, parent: Any) -> None:
        self.settings = get_settings()
        self.client = connect(self.settings)
        self.hostname = parent.hostname
        self._safe_tick()
        self._timer_ref = parent.timer.call_repeatedly(
            self.interval(self.settings), self._safe_tick, priority=10
        )

    def stop(self, parent: Any) -> None:
        if self._timer_ref is not None:
            self._timer_ref.cancel()

    def _safe_tick(self) -> None:
        """Never raises: the first tick runs inside `start`, before the consumer, and an
        error there would stop the worker (Celery exits on a step that fails to start),
        just when a sweep after a crash is needed. The next tick tries again."""
        try:
            self.tick()
        except redis.RedisError as exc:  # Redis away: try again next tick
            log.debug("%s skipped: %s", type(self).__name__, exc)
        except Exception:  # the broker away (kombu), or anything else
            log.exception("%s failed; the next tick tries again", type(self).__name__)


class Heartbeat(_TimerStep):
    def interval(self, settings: Settings) -> float:
        return settings.worker_heartbeat_seconds

    def tick(self) -> None:
        assert self.client is not None
        value = json.dumps({"pid": os.getpid(), "at": int(time.time())})
        key = worker_heartbeat(self.settings.key_prefix, self.hostname)
        self.client.set(key, value, ex=self.settings.worker_heartbeat_seconds * 3)

    def stop(self, parent: Any) -> None:
        super().stop(parent)
        if self.client is not None:
            with contextlib.suppress(redis.RedisError):
                self.client.delete(worker_heartbeat(self.settings.key_prefix, self.hostname))


class RecoverySweep(_TimerStep):
    def interval(self, settings: Settings) -> float:
        return settings.recovery_interval_seconds

    def tick(self) -> None:
        from worker.recovery import sweep
        from worker.runtime import requeue_session, schedule_delivery

        assert self.client is not None
        s = self.settings
        if not self.client.set(
            sweeper_lock(s.key_prefix), self.hostname, nx=True, ex=s.recovery_interval_seconds
        ):
            return
        sweep(self.client, s, requeue_session, schedule_delivery, now=time.time())
