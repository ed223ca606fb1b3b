"""The per-conversation lock: one generation at a time, and a dead holder forgotten fast.

The lock's expiry is short and a background thread renews it while its holder lives, so
a generation may take as long as it needs, yet a worker killed mid-generation blocks its
conversation for at most LOCK_TIMEOUT_SECONDS (the recovery sweep then takes over).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import redis
from redis.exceptions import LockError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def session_lock(client: redis.Redis, name: str, ttl: float) -> Iterator[bool]:
    """Yield True while holding the lock (renewed every ttl/3), False if another holds it."""
    # thread_local=False: the renewal thread must see the token the holder acquired with.
    lock = client.lock(name, timeout=ttl, blocking=False, thread_local=False)
    if not lock.acquire():
        yield False
        return
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl / 3):
            try:
                lock.reacquire()
            except LockError:
                log.warning("session lock was lost before renewal")
                return
            except redis.RedisError as exc:
                log.warning("session lock renewal failed: %s", exc)

    renewer = threading.Thread(target=renew, name="session-lock-renewal", daemon=True)
    renewer.start()
    try:
        yield True
    finally:
        stop.set()
        renewer.join()
        try:
            lock.release()
        except LockError:
            log.warning("session lock expired before release")
        except redis.RedisError as exc:
            log.warning("session lock release failed (it will expire): %s", exc)
