"""Replies between "stored" and "delivered": the session outbox and the dead letters.

`commit` puts a reply in its session's outbox in the same script that stores the turn,
so a worker that dies before delivering leaves it there for the recovery sweep. A reply
that cannot be delivered moves to the dead letters, where an operator can list, replay
or purge it (`python -m worker dead-letters …`).

Moving to the dead letters (a delivery attempt giving up, the sweep expiring a reply) is:
`DeadLetters.add`, then remove the outbox entry; if the entry was already gone and this
caller's letter was the first one, take back that letter (`remove_if`): someone else
delivered the reply. A letter that replaced an existing one is never taken back, so two
callers giving up on the same reply at once leave exactly one letter, never none.
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


# KEYS: hash   ARGV: field, expected value, new value ('' = delete the field).
# Compare-and-set: writes only if the field still holds what the caller read.
_REPLACE_IF_UNCHANGED = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
return 1
"""


class Outbox:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._update = client.register_script(_UPDATE_IF_PRESENT)
        self._replace = client.register_script(_REPLACE_IF_UNCHANGED)

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

    def replace(
        self, keys: SessionKeys, idempotency_key: str, expected: str, entry: OutboxEntry | None
    ) -> bool:
        """Write `entry` (None: remove it) only if the stored one is still `expected`.

        For a caller that read the entry a while ago (the sweep): whatever a delivery
        attempt wrote or removed since then wins, and this returns False.
        """
        new = entry.model_dump_json() if entry is not None else ""
        return bool(self._replace(keys=[keys.outbox], args=[idempotency_key, expected, new]))

    def remove(self, keys: SessionKeys, idempotency_key: str) -> bool:
        """True if the entry was there (this caller is the one that settled it)."""
        return bool(self._client.hdel(keys.outbox, idempotency_key))


class DeadLetters:
    """One hash for the whole deployment: few entries, read by operators."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._key = dead_letters(prefix)
        self._replace = client.register_script(_REPLACE_IF_UNCHANGED)

    def add(self, entry: OutboxEntry) -> bool:
        """Store (or replace) the letter; True if there was none for this reply before."""
        return bool(self._client.hset(self._key, entry.idempotency_key, entry.model_dump_json()))

    def remove_if(self, entry: OutboxEntry) -> bool:
        """Take back a letter this caller added, unless someone replaced it since."""
        return bool(
            self._replace(
                keys=[self._key], args=[entry.idempotency_key, entry.model_dump_json(), ""]
            )
        )

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


def move_to_dead_letters(
    outbox: Outbox,
    dead_letters: DeadLetters,
    keys: SessionKeys,
    letter: OutboxEntry,
    expected: str | None = None,
) -> bool:
    """Give up on a reply, as the module docstring says; False if it had already left the
    outbox (or, with `expected`, no longer reads so): whoever settled it meanwhile wins."""
    first = dead_letters.add(letter)
    if expected is None:
        left = outbox.remove(keys, letter.idempotency_key)
    else:
        left = outbox.replace(keys, letter.idempotency_key, expected, None)
    if not left and first:
        dead_letters.remove_if(letter)
    return left
