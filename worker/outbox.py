"""Replies between "stored" and "delivered": the session outbox and the dead letters.

`commit` puts a reply in its session's outbox in the same script that stores the turn,
so a worker that dies before delivering leaves it there for the recovery sweep. A reply
that cannot be delivered moves to the dead letters, where an operator can list, replay
or purge it (`python -m worker dead-letters …`).
"""

from __future__ import annotations

import redis

from common.keys import SessionKeys, dead_letters
from common.messages import OutboxEntry

# KEYS: outbox   ARGV: field, entry json. Updates only an entry that is still there, so a
# late retry bookkeeping never brings back a reply that was delivered meanwhile.
_UPDATE_IF_PRESENT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""


class Outbox:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._update = client.register_script(_UPDATE_IF_PRESENT)

    def get(self, keys: SessionKeys, idempotency_key: str) -> OutboxEntry | None:
        raw = self._client.hget(keys.outbox, idempotency_key)
        return OutboxEntry.model_validate_json(raw) if raw else None

    def entries(self, keys: SessionKeys) -> list[OutboxEntry]:
        return [OutboxEntry.model_validate_json(raw) for raw in self._client.hvals(keys.outbox)]

    def update(self, keys: SessionKeys, entry: OutboxEntry) -> bool:
        """Record attempts and the next attempt time; False if the entry is gone."""
        return bool(
            self._update(keys=[keys.outbox], args=[entry.idempotency_key, entry.model_dump_json()])
        )

    def remove(self, keys: SessionKeys, idempotency_key: str) -> bool:
        """True if the entry was there (this caller is the one that settled it)."""
        return bool(self._client.hdel(keys.outbox, idempotency_key))


class DeadLetters:
    """One hash for the whole deployment: few entries, read by operators."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._key = dead_letters(prefix)

    def add(self, entry: OutboxEntry) -> None:
        self._client.hset(self._key, entry.idempotency_key, entry.model_dump_json())

    def all(self) -> list[OutboxEntry]:
        entries = [OutboxEntry.model_validate_json(raw) for raw in self._client.hvals(self._key)]
        return sorted(entries, key=lambda e: e.failed_at or 0)

    def get(self, idempotency_key: str) -> OutboxEntry | None:
        raw = self._client.hget(self._key, idempotency_key)
        return OutboxEntry.model_validate_json(raw) if raw else None

    def remove(self, *idempotency_keys: str) -> int:
        return int(self._client.hdel(self._key, *idempotency_keys)) if idempotency_keys else 0

    def purge(self) -> int:
        count = int(self._client.hlen(self._key))
        self._client.delete(self._key)
        return count
