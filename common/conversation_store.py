"""The conversation history: the answered turns, capped and expiring.

The history is a hash (who, when) plus a capped list of messages, so appending a turn is
O(1) and never rewrites the whole conversation. `commit` stores the user messages and the
reply and clears the worker's `processing` list in one script: either both happen or
neither, which is what keeps a crash from answering a message twice or never. The reply
goes to the session's outbox, whose expiry (`outbox_ttl_seconds`) outlives its delivery.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis
from pydantic import TypeAdapter
from typing_extensions import TypedDict  # pydantic reads typing's own only from Python 3.12

from common.inbox import Batch, LockedClaim
from common.keys import SessionKeys
from common.messages import Conversation, OutboxEntry, StoredMessage
from common.settings import Settings

# How long an outbox outlives its last reply beyond the longest delivery: time for the
# workers to come back after an outage, so the sweep still finds what they owe.
OUTBOX_MARGIN_SECONDS = 86400


def outbox_ttl_seconds(settings: Settings) -> int:
    """Expiry of a session's outbox, renewed with each reply it receives.

    Not SESSION_EXPIRE_TIME: a reply whose delivery is still being retried must stay
    until it is delivered or moved to the dead letters, never expire with the
    conversation. The longest delivery is: retries until CALLBACK_MAX_AGE_SECONDS, the
    last backoff, the last attempt's timeout, and the sweep noticing a lost attempt.
    """
    s = settings
    longest_delivery = (
        s.callback_max_age_seconds
        + s.callback_max_backoff_seconds
        + math.ceil(s.callback_timeout_seconds)
        + s.recovery_grace_seconds
        + s.recovery_interval_seconds
    )
    return longest_delivery + OUTBOX_MARGIN_SECONDS


# KEYS: conversation, messages, processing, outbox
# ARGV: first claimed raw item, claimed count, conversation id, user id, now,
#       max history, ttl, metadata json, outbox field, outbox entry json ('' = none),
#       '1' to start the conversation afresh (reset command) else '0',
#       outbox ttl, stored message json...
_COMMIT = """
if redis.call('LLEN', KEYS[3]) ~= tonumber(ARGV[2])
   or redis.call('LINDEX', KEYS[3], 0) ~= ARGV[1] then
  return false
end
if ARGV[11] == '1' then redis.call('DEL', KEYS[1], KEYS[2]) end
redis.call('HSETNX', KEYS[1], 'conversation_id', ARGV[3])
redis.call('HSETNX', KEYS[1], 'user_id', ARGV[4])
redis.call('HSETNX', KEYS[1], 'created_at', ARGV[5])
redis.call('HSET', KEYS[1], 'updated_at', ARGV[5])
if ARGV[8] ~= '{}' or redis.call('HEXISTS', KEYS[1], 'metadata') == 0 then
  redis.call('HSET', KEYS[1], 'metadata', ARGV[8])
end
if ARGV[10] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[9], ARGV[10])
  redis.call('EXPIRE', KEYS[4], ARGV[12])
end
for i = 13, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[6]), -1)
redis.call('DEL', KEYS[3])
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[7])
return 1
"""


_MESSAGES = TypeAdapter(list[StoredMessage])


class HistoryTurn(TypedDict):
    """What a reply needs of a stored message. Validating only these two fields (the rest
    is skipped) took 34 µs for a 50-message history against 79 for building each
    `StoredMessage`, and cut a reply round's instructions by 9% (bench/HISTORY.md)."""

    role: Literal["user", "assistant"]
    content: str


_HISTORY_TURNS = TypeAdapter(list[HistoryTurn])


def new_conversation_id(user_id: str, created_epoch: int) -> str:
    """The id a conversation gets with its first reply (or its first after a reset)."""
    return f"conv_{user_id}_{created_epoch}"


def history_json(raw_messages: Sequence[str]) -> str:
    """Stored messages (each JSON) as the one JSON array `Inbox.lock_and_claim` returns."""
    return "[" + ",".join(raw_messages) + "]"


@dataclass(frozen=True)
class StoredConversation:
    turns: list[HistoryTurn]  # oldest first
    conversation_id: str | None  # None until the first reply is committed

    @classmethod
    def parse(cls, history: str, conversation_id: str | None) -> StoredConversation:
        """From the stored messages as one JSON array (`history_json`)."""
        return cls(_HISTORY_TURNS.validate_json(history), conversation_id)


class ConversationStore:
    """Reads and writes conversation histories."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._client = client
        self._settings = settings
        self._commit = client.register_script(_COMMIT)

    def turns(self, keys: SessionKeys) -> list[StoredMessage]:
        """The stored history, oldest first."""
        # One validation call for the whole list: faster than one per message.
        return _MESSAGES.validate_json(history_json(self._client.lrange(keys.messages, 0, -1)))

    def load(self, keys: SessionKeys) -> StoredConversation:
        """History and conversation id in one round trip: what a reply is built from."""
        pipe = self._client.pipeline(transaction=False)
        pipe.lrange(keys.messages, 0, -1)
        pipe.hget(keys.conversation, "conversation_id")
        raw_messages, conversation_id = pipe.execute()
        return StoredConversation.parse(history_json(raw_messages), conversation_id)

    @staticmethod
    def from_claim(claim: LockedClaim) -> StoredConversation:
        """The history `Inbox.lock_and_claim` read with its claim, as `load` gives it."""
        return StoredConversation.parse(claim.history_json, claim.conversation_id)

    def commit(
        self,
        keys: SessionKeys,
        batch: Batch,
        *,
        conversation_id: str,
        user_id: str,
        messages: Sequence[StoredMessage],
        metadata: dict[str, Any],
        now: str,
        outbox: OutboxEntry | None,
        fresh: bool = False,
    ) -> bool:
        """Store the answered turn and its outgoing reply; False if the claim was lost.

        The claim is identified by its size and first item: if another worker already
        committed (or the processing list changed), nothing is written.
        """
        s = self._settings
        committed = self._commit(
            keys=[keys.conversation, keys.messages, keys.processing, keys.outbox],
            args=[
                batch.raw[0],
                len(batch.raw),
                conversation_id,
                user_id,
                now,
                s.max_history_messages,
                s.session_expire_time,
                json.dumps(metadata, separators=(",", ":")),
                outbox.idempotency_key if outbox else "",
                outbox.model_dump_json() if outbox else "",
                "1" if fresh else "0",
                outbox_ttl_seconds(s),
                *(m.model_dump_json() for m in messages),
            ],
        )
        return bool(committed)

    def history(self, keys: SessionKeys) -> Conversation | None:
        pipe = self._client.pipeline(transaction=False)
        pipe.hgetall(keys.conversation)
        pipe.lrange(keys.messages, 0, -1)
        header, raw_messages = pipe.execute()
        if not header:
            return None
        return Conversation(
            conversation_id=header["conversation_id"],
            user_id=header["user_id"],
            created_at=header["created_at"],
            updated_at=header["updated_at"],
            metadata=json.loads(header.get("metadata") or "{}"),
            messages=[StoredMessage.model_validate_json(raw) for raw in raw_messages],
        )

    def erase(self, keys: SessionKeys) -> bool:
        """Delete a conversation and anything pending for it; True if something existed."""
        return bool(self._client.delete(*keys.all_conversation_keys()))
