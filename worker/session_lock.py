"""The per-conversation lock: one generation at a time, and a dead holder forgotten fast.

The lock's expiry is short and the process's `LockRenewer` renews it while its holder
lives, so a generation may take as long as it needs, yet a worker killed mid-generation
blocks its conversation for at most LOCK_TIMEOUT_SECONDS (the recovery sweep then takes
over). One renewal thread serves every lock a process holds: starting and joining a thread
per task cost ~12% of a worker's CPU with an instant model (bench/HISTORY.md, section 2).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import redis

from common.inbox import Released
from common.keys import SessionKeys

log = logging.getLogger(__name__)


# Renews one lock: True while it is still ours; False once it was lost (stop renewing).
Renew = Callable[[], bool]
# Takes a session's lock with (token, ttl in ms) if no one holds it: True if it did.
Acquire = Callable[[str, int], bool]
T = TypeVar("T")
# Ends a round held with (token, ttl in ms): keeps the lock and returns the next round's
# start, or lets the lock go (`Inbox.claim_more_or_release`).
EndRound = Callable[[str, int], T | Released]


@dataclass
class _Held:
    renew: Renew
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
        # The deadline the thread sleeps until (None: until notified). `hold` reads it under
        # the condition, which the thread holds except while it sleeps; a thread that has
        # not slept yet looks at every lock before it does.
        self._wakes_at: float | None = None

    @property
    def holding(self) -> int:
        """How many locks are being renewed now."""
        with self._changed:
            return len(self._held)

    def hold(self, renew: Renew, ttl: float) -> int:
        """Call `renew` every ttl/3 from now on; the returned handle is what `drop` takes."""
        with self._changed:
            if self._thread is None:  # first use in this process, or after close()
                self._closed = False
                self._thread = threading.Thread(
                    target=self._run, name="session-lock-renewal", daemon=True
                )
                self._thread.start()
            handle = next(self._ids)
            due = time.monotonic() + ttl / 3
            self._held[handle] = _Held(renew, ttl / 3, due)
            # Wake the thread only if it would sleep past this lock's first renewal. With
            # one TTL for all locks, that is only when it sleeps with no deadline (nothing
            # held at its last wake-up): waking it for every lock cost each reply round a
            # thread switch (bench/HISTORY.md, section 2).
            if self._wakes_at is None or due < self._wakes_at:
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
        # Renewals run under the condition, so `drop` waits for one in flight (at most the
        # Redis socket timeout) and a dropped lock is never renewed after its release.
        with self._changed:
            while not self._closed:
                now = time.monotonic()
                for handle, held in list(self._held.items()):
                    if held.due <= now:
                        held.due = now + held.interval
                        if not self._renew(held.renew):
                            del self._held[handle]
                next_due = min((held.due for held in self._held.values()), default=None)
                self._wakes_at = next_due
                self._changed.wait(None if next_due is None else max(0.0, next_due - now))

    @staticmethod
    def _renew(renew: Renew) -> bool:
        """Reset the lock's TTL; False once it is no longer ours (then stop renewing it)."""
        try:
            if renew():
                return True
            log.warning("session lock was lost before renewal")
            return False
        except redis.RedisError as exc:
            log.warning("session lock renewal failed: %s", exc)
            return True
        except Exception:  # the thread serves every lock of the process: it must go on
            log.exception("session lock renewal failed")
            return True


# KEYS: lock   ARGV: token, ttl in ms. 1 if the lock is still ours (and now has a fresh TTL).
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: lock, inbox, processing   ARGV: token. Deletes the lock if it is still ours, and in
# the same step counts what waits: a message accepted while the lock was held got no task
# (the webhook leaves it to the holder), so the holder must see it, and nothing can slip in
# between the release and the count.
_RELEASE = """
local ours = redis.call('GET', KEYS[1]) == ARGV[1]
if ours then redis.call('DEL', KEYS[1]) end
return {ours and 1 or 0, redis.call('LLEN', KEYS[2]) + redis.call('LLEN', KEYS[3])}
"""


@dataclass
class Hold:
    """One try at a session's lock: whether it was taken and, after release, what waits."""

    acquired: bool = False
    # Messages in the inbox and processing list when the lock was released; None if the
    # lock was never held or the release could not reach Redis.
    waiting: int | None = None
    token: str = ""
    # Let go by `SessionLocks.end_round` already: the block's end releases nothing then.
    released: bool = False
    # Set while `end_round` may release the lock: the renewer leaves it alone meanwhile,
    # as it does once `released` (until the block's end drops it).
    ending: bool = False


class SessionLocks:
    """The per-session locks of one process: a token and a short TTL, renewed by `renewer`."""

    def __init__(self, client: redis.Redis, ttl: float, renewer: LockRenewer) -> None:
        self._client = client
        self._ttl = ttl
        self._ttl_ms = int(ttl * 1000)
        self._renewer = renewer
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @contextlib.contextmanager
    def hold(self, keys: SessionKeys, acquire: Acquire | None = None) -> Iterator[Hold]:
        """Hold the session's lock for the block if no one else does (`Hold.acquired`).

        `acquire` replaces the plain `SET NX PX`, for a script that takes the lock and
        does its first step in the same round trip (`Inbox.lock_and_claim`).
        """
        hold = Hold(token=secrets.token_hex(16))
        token, ttl_ms = hold.token, self._ttl_ms
        try:
            if acquire is None:
                taken = bool(self._client.set(keys.lock, token, nx=True, px=ttl_ms))
            else:
                taken = acquire(token, ttl_ms)
        except Exception:
            # A script that took the lock may fail after that step: free the lock now
            # rather than leave the session blocked until it expires.
            with contextlib.suppress(redis.RedisError):
                self._release_and_count(keys, token)
            raise
        if not taken:
            yield hold
            return
        hold.acquired = True
        handle = self._renewer.hold(
            lambda: (
                hold.ending
                or hold.released
                or self._renew(keys=[keys.lock], args=[token, ttl_ms]) == 1
            ),
            self._ttl,
        )
        try:
            yield hold
        finally:
            self._renewer.drop(handle)
            if not hold.released:
                try:
                    _record(hold, self._release_and_count(keys, token))
                except redis.RedisError as exc:
                    log.warning("session lock release failed (it will expire): %s", exc)

    def end_round(self, hold: Hold, step: EndRound[T]) -> T | None:
        """Run `step` at the end of a round in `hold`'s block: what it returns when it
        kept the lock, or None when it let it go (then `hold.waiting` says what waited).

        Keeping the lock for the next round saves a release and a new take (two round
        trips, a new token and a renewal handle) for each message that arrived meanwhile.
        """
        hold.ending = True  # a renewal now would find the lock gone and warn: skip it
        try:
            result = step(hold.token, self._ttl_ms)
        finally:
            hold.ending = False
        if not isinstance(result, Released):
            return result
        _record(hold, result)
        return None

    def _release_and_count(self, keys: SessionKeys, token: str) -> Released:
        """Delete the lock if `token` still holds it, and count what waits."""
        ours, waiting = self._release(keys=[keys.lock, keys.inbox, keys.processing], args=[token])
        return Released(ours=bool(ours), waiting=int(waiting))


def _record(hold: Hold, released: Released) -> None:
    """The hold's lock is let go (by the release script or by an end of round)."""
    hold.released, hold.waiting = True, released.waiting
    if not released.ours:
        log.warning("session lock expired before release")
