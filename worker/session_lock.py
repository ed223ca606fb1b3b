"""The per-conversation lock: one generation at a time, and a dead holder forgotten fast.

The lock's expiry is short and the process's `LockRenewer` renews it while its holder
lives, so a generation may take as long as it needs, yet a worker killed mid-generation
blocks its conversation for at most LOCK_TIMEOUT_SECONDS (the recovery sweep then takes
over). One renewal thread serves every lock a process holds: starting and joining a thread
per task cost ~12% of a worker's CPU with an instant model (BENCHMARKS.md, section 2).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import redis
from redis.exceptions import LockError
from redis.lock import Lock

log = logging.getLogger(__name__)


@dataclass
class _Held:
    lock: Lock
    interval: float
    due: float


class LockRenewer:
    """Renews every held lock at a third of its TTL, from one daemon thread per process.

    The thread starts on first use in each process: a forked child (prefork pool) starts
    afresh, with nothing held and its own thread. A lock dropped by its holder is never
    renewed afterwards: renewals and drops take turns.
    """

    def __init__(self) -> None:
        self._ids = itertools.count()
        self._start_afresh()
        after_fork = weakref.WeakMethod(self._start_afresh)
        os.register_at_fork(after_in_child=lambda: (method := after_fork()) and method())

    def _start_afresh(self) -> None:
        # In a child, the parent's condition may have been mid-use by a thread that is gone.
        self._held: dict[int, _Held] = {}
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def holding(self) -> int:
        """How many locks are being renewed now."""
        with self._changed:
            return len(self._held)

    def hold(self, lock: Lock, ttl: float) -> int:
        """Renew `lock` from now on; the returned handle is what `drop` takes."""
        with self._changed:
            if self._thread is None:  # first use in this process, or after close()
                self._closed = False
                self._thread = threading.Thread(
                    target=self._run, name="session-lock-renewal", daemon=True
                )
                self._thread.start()
            handle = next(self._ids)
            self._held[handle] = _Held(lock, ttl / 3, time.monotonic() + ttl / 3)
            self._changed.notify()
            return handle

    def drop(self, handle: int) -> None:
        """Stop renewing; once this returns, no renewal of that lock is in flight."""
        with self._changed:
            self._held.pop(handle, None)

    def close(self) -> None:
        """Stop the thread (tests; a worker's daemon thread ends with its process)."""
        with self._changed:
            self._closed = True
            self._changed.notify()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        with self._changed:
            while not self._closed:
                now = time.monotonic()
                for handle, held in list(self._held.items()):
                    if held.due <= now:
                        held.due = now + held.interval
                        if not self._renew(held.lock):
                            del self._held[handle]
                next_due = min((held.due for held in self._held.values()), default=None)
                self._changed.wait(None if next_due is None else max(0.0, next_due - now))

    @staticmethod
    def _renew(lock: Lock) -> bool:
        """Reset the lock's TTL; False once it is no longer ours (then stop renewing it)."""
        try:
            lock.reacquire()
        except LockError:
            log.warning("session lock was lost before renewal")
            return False
        except redis.RedisError as exc:
            log.warning("session lock renewal failed: %s", exc)
        return True


@contextlib.contextmanager
def session_lock(
    client: redis.Redis, name: str, ttl: float, renewer: LockRenewer
) -> Iterator[bool]:
    """Yield True while holding the lock (renewed by `renewer`), False if another holds it."""
    # thread_local=False: the renewal thread must see the token the holder acquired with.
    lock = client.lock(name, timeout=ttl, blocking=False, thread_local=False)
    if not lock.acquire():
        yield False
        return
    handle = renewer.hold(lock, ttl)
    try:
        yield True
    finally:
        renewer.drop(handle)
        try:
            lock.release()
        except LockError:
            log.warning("session lock expired before release")
        except redis.RedisError as exc:
            log.warning("session lock release failed (it will expire): %s", exc)
