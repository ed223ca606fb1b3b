"""The per-session inbox: how a message is accepted, and how a worker claims a batch.

Each step is one Lua script, so a message is de-duplicated, rate-counted and queued in
a single round trip, and a claim moves messages to the crash-safe `processing` list
atomically: a worker that dies after claiming leaves them there for the next one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import redis

from common.keys import SessionKeys
from common.messages import PendingMessage
from common.settings import Settings

RATE_WINDOW_SECONDS = 60

# KEYS: seen, rate, inbox, conversation, messages, lock[, task queue]
# ARGV: message json, dedupe ttl, rate limit (0 = off), rate window, max pending, session ttl
#       [, task message]
# Returns {status, number, task needed}. Every accepted message renews the conversation's
# TTL, as the seeds did. A message that arrives while a worker holds the session's lock
# needs no task: the holder looks at the inbox after releasing it and answers it then
# (its own task would find the lock taken and leave). Otherwise, with a task queue (the
# broker is this same Redis), the reply task is queued in the same step.
_ACCEPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'duplicate', 0, 0}
end
local limit = tonumber(ARGV[3])
if limit > 0 then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used >= limit then
    local ttl = redis.call('TTL', KEYS[2])
    if ttl < 1 then ttl = tonumber(ARGV[4]) end
    return {'rate_limited', ttl, 0}
  end
end
if redis.call('LLEN', KEYS[3]) >= tonumber(ARGV[5]) then
  return {'inbox_full', 0, 0}
end
if limit > 0 and redis.call('INCR', KEYS[2]) == 1 then
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[2])
local size = redis.call('RPUSH', KEYS[3], ARGV[1])
for i = 3, 5 do redis.call('EXPIRE', KEYS[i], ARGV[6]) end
if redis.call('EXISTS', KEYS[6]) == 1 then
  return {'queued', size, 0}
end
if KEYS[7] then redis.call('LPUSH', KEYS[7], ARGV[7]) end
return {'queued', size, 1}
"""

# KEYS: seen, rate, inbox   ARGV: message json
_WITHDRAW = """
local removed = redis.call('LREM', KEYS[3], 1, ARGV[1])
if removed > 0 then
  redis.call('DEL', KEYS[1])
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('DECR', KEYS[2]) end
end
return removed
"""

# The claim: a non-empty processing list means an earlier claim was never answered (its
# worker died): that batch is answered first and alone, so its reply keeps the same
# idempotency key. Otherwise everything pending moves to `processing`, by renaming the
# list (both keys share the session's hash slot): an RPUSH of the items would need Lua's
# unpack, which fails from ~8000 items on, after the inbox was already deleted.
_CLAIM_STEPS = """
if redis.call('LLEN', processing) > 0 then
  return redis.call('LRANGE', processing, 0, -1)
end
local pending = redis.call('LRANGE', inbox, 0, -1)
if #pending == 0 then return pending end
redis.call('RENAME', inbox, processing)
redis.call('EXPIRE', processing, ttl)
return pending
"""

# KEYS: inbox, processing   ARGV: session ttl
_CLAIM = "local inbox, processing, ttl = KEYS[1], KEYS[2], ARGV[1]" + _CLAIM_STEPS

# KEYS: lock, inbox, processing, messages, conversation   ARGV: token, lock ttl in ms,
# session ttl. Takes the session's lock (as SessionLocks does), claims, and reads the
# history a reply is built from: one round trip where the lock, the claim and the history
# took three. nil, with nothing claimed, when another worker holds the lock. The history
# comes back as one JSON array (its items are JSON already): one reply string to read
# instead of up to MAX_HISTORY_MESSAGES, which redis-py would parse one by one.
_CLAIM_WITH_HISTORY = (
    "local inbox, processing, ttl = KEYS[2], KEYS[3], ARGV[3]\n"
    "local function claim()" + _CLAIM_STEPS + "end\n"
    "local history = '[' .. table.concat(redis.call('LRANGE', KEYS[4], 0, -1), ',') .. ']'\n"
    "return {claim(), history,"
    " redis.call('HGET', KEYS[5], 'conversation_id')}"
)
_LOCK_AND_CLAIM = (
    "if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end\n"
    + _CLAIM_WITH_HISTORY
)

# KEYS and ARGV as _LOCK_AND_CLAIM's. The end of a round for a holder that claims as soon
# as it holds the lock: with messages waiting, keep the lock (a fresh TTL, the same token)
# and claim them with the history, as a release followed by _LOCK_AND_CLAIM would, in one
# round trip instead of two; with none, release it. {released, waiting} when it was let go
# (released 0: the lock was no longer ours), or the claim as _LOCK_AND_CLAIM returns it.
_CLAIM_MORE_OR_RELEASE = (
    "local waiting = redis.call('LLEN', KEYS[2]) + redis.call('LLEN', KEYS[3])\n"
    "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0, waiting} end\n"
    "if waiting == 0 then redis.call('DEL', KEYS[1]) return {1, 0} end\n"
    "redis.call('PEXPIRE', KEYS[1], ARGV[2])\n" + _CLAIM_WITH_HISTORY
)

AcceptStatus = Literal["queued", "duplicate", "rate_limited", "inbox_full"]


@dataclass(frozen=True)
class AcceptResult:
    status: AcceptStatus
    pending: int = 0  # inbox size after a queued message
    retry_after: int = 0  # seconds, for rate_limited
    # A queued message needs a reply task unless the session's lock holder will answer it.
    needs_task: bool = False


@dataclass(frozen=True)
class QueuedTask:
    """A broker message to push onto `queue` (a list in this same Redis) on acceptance."""

    queue: str
    message: str


@dataclass(frozen=True)
class Batch:
    """Messages claimed together; `raw` identifies the claim when its answer is committed."""

    raw: list[str]
    messages: list[PendingMessage]

    def __bool__(self) -> bool:
        return bool(self.messages)


def _batch(raw: list[str]) -> Batch:
    return Batch(raw=list(raw), messages=[PendingMessage.model_validate_json(i) for i in raw])


@dataclass(frozen=True)
class Released:
    """A session's lock let go at the end of a round, and what waited for it then."""

    ours: bool  # False: the lock had expired or been taken over before the release
    waiting: int  # messages in the inbox and processing list at the release


@dataclass(frozen=True)
class LockedClaim:
    """What a round starts from once the lock is taken: the batch and the stored history."""

    batch: Batch
    history_json: str  # the session's stored messages as one JSON array, oldest first
    conversation_id: str | None  # None until a first reply was committed


def _locked_claim(found: list[Any]) -> LockedClaim:
    claimed, history_json, conversation_id = found
    return LockedClaim(_batch(claimed), history_json, conversation_id)


class Inbox:
    """Accept and claim operations for the inboxes of all sessions."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._settings = settings
        self._accept = client.register_script(_ACCEPT)
        self._withdraw = client.register_script(_WITHDRAW)
        self._claim = client.register_script(_CLAIM)
        self._lock_and_claim = client.register_script(_LOCK_AND_CLAIM)
        self._claim_more_or_release = client.register_script(_CLAIM_MORE_OR_RELEASE)
        self._client = client

    def accept(
        self, keys: SessionKeys, message: PendingMessage, task: QueuedTask | None = None
    ) -> AcceptResult:
        """Store the message once; with `task`, also queue it if stored and no worker
        holds the session (then that worker answers it: `needs_task` is False)."""
        s = self._settings
        script_keys = [
            keys.seen(message.message_id),
            keys.rate,
            keys.inbox,
            keys.conversation,
            keys.messages,
            keys.lock,
        ]
        args: list[str | int] = [
            message.model_dump_json(),
            s.dedupe_ttl_seconds,
            s.rate_limit_per_minute,
            RATE_WINDOW_SECONDS,
            s.max_pending_per_session,
            s.session_expire_time,
        ]
        if task is not None:
            script_keys.append(task.queue)
            args.append(task.message)
        status, number, needs_task = self._accept(keys=script_keys, args=args)
        if status == "queued":
            return AcceptResult("queued", pending=int(number), needs_task=bool(needs_task))
        if status == "rate_limited":
            return AcceptResult("rate_limited", retry_after=int(number))
        return AcceptResult(status)

    def withdraw(self, keys: SessionKeys, message: PendingMessage) -> bool:
        """Undo an accept whose task could not be enqueued, so the client's retry is new."""
        removed = self._withdraw(
            keys=[keys.seen(message.message_id), keys.rate, keys.inbox],
            args=[message.model_dump_json()],
        )
        return bool(removed)

    def claim(self, keys: SessionKeys) -> Batch:
        """Move everything pending to `processing` and return it, oldest first."""
        raw = self._claim(
            keys=[keys.inbox, keys.processing], args=[self._settings.session_expire_time]
        )
        return _batch(raw)

    def lock_and_claim(self, keys: SessionKeys, token: str, lock_ttl_ms: int) -> LockedClaim | None:
        """Take the session's lock with `token`, claim, and read the history: None if the
        lock is taken. For callers that claim as soon as they hold the lock
        (`SessionLocks.hold(keys, acquire=…)`)."""
        found = self._lock_and_claim(**self._claim_with_history_args(keys, token, lock_ttl_ms))
        return None if found is None else _locked_claim(found)

    def claim_more_or_release(
        self, keys: SessionKeys, token: str, lock_ttl_ms: int
    ) -> LockedClaim | Released:
        """End a round held with `token`: claim what waits (keeping the lock, its TTL
        renewed) or, with nothing waiting, release the lock (`SessionLocks.end_round`)."""
        found = self._claim_more_or_release(
            **self._claim_with_history_args(keys, token, lock_ttl_ms)
        )
        if len(found) == 2:
            return Released(ours=bool(found[0]), waiting=int(found[1]))
        return _locked_claim(found)

    def _claim_with_history_args(
        self, keys: SessionKeys, token: str, lock_ttl_ms: int
    ) -> dict[str, list[Any]]:
        """KEYS and ARGV of the two scripts built on _CLAIM_WITH_HISTORY."""
        return {
            "keys": [keys.lock, keys.inbox, keys.processing, keys.messages, keys.conversation],
            "args": [token, lock_ttl_ms, self._settings.session_expire_time],
        }

    def has_pending(self, keys: SessionKeys) -> bool:
        pipe = self._client.pipeline(transaction=False)
        pipe.llen(keys.inbox)
        pipe.llen(keys.processing)
        inbox, processing = pipe.execute()
        return bool(inbox or processing)
