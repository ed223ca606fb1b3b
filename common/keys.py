"""The whole Redis layout on one screen.

Every key of one conversation starts with `<prefix>:{<session>}` so Redis Cluster puts
them in one hash slot, which keeps the Lua scripts that touch several of them legal there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SessionKeys:
    """Key names for one conversation."""

    base: str

    @property
    def conversation(self) -> str:
        """Hash: conversation_id, user_id, created_at, updated_at, metadata."""
        return f"{self.base}:conversation"

    @property
    def messages(self) -> str:
        """List of stored message JSON, oldest first, capped at MAX_HISTORY_MESSAGES."""
        return f"{self.base}:messages"

    @property
    def inbox(self) -> str:
        """List of accepted messages that no worker has claimed yet."""
        return f"{self.base}:inbox"

    @property
    def processing(self) -> str:
        """List of messages a worker has claimed and not yet answered (crash-safe)."""
        return f"{self.base}:processing"

    @property
    def lock(self) -> str:
        """Token of the worker generating for this session, with an expiry."""
        return f"{self.base}:lock"

    @property
    def rate(self) -> str:
        """Messages accepted in the current one-minute window."""
        return f"{self.base}:rate"

    @property
    def outbox(self) -> str:
        """Hash of replies stored but not yet delivered, by idempotency key."""
        return f"{self.base}:outbox"

    @property
    def requeued(self) -> str:
        """The stranded state the recovery sweep last re-queued this session for (expires)."""
        return f"{self.base}:requeued"

    def seen(self, message_id: str) -> str:
        """De-duplication mark of one message id."""
        return f"{self.base}:seen:{message_id}"

    def all_conversation_keys(self) -> list[str]:
        """What erasing a conversation deletes (dedupe marks expire on their own)."""
        return [self.conversation, self.messages, self.inbox, self.processing, self.outbox]


def session_keys(prefix: str, session_id: str) -> SessionKeys:
    return SessionKeys(base=f"{prefix}:{{{session_id}}}")


def session_pattern(prefix: str, kind: str) -> str:
    """SCAN pattern for one kind of per-session key, e.g. every `processing` list."""
    return f"{prefix}:{{*}}:{kind}"


def session_of(prefix: str, key: str) -> str:
    """The session inside a per-session key name (inverse of `session_keys`)."""
    return key[len(prefix) + 2 : key.rindex("}")]


def dead_letters(prefix: str) -> str:
    """Hash of replies that could not be delivered, by idempotency key."""
    return f"{prefix}:dead_letters"


def sweeper_lock(prefix: str) -> str:
    """Held for one interval by the worker that runs the recovery sweep."""
    return f"{prefix}:sweeper"


def worker_heartbeat(prefix: str, hostname: str) -> str:
    """Set by each worker with a short TTL so `/ready` can tell whether one is alive."""
    return f"{prefix}:worker:{hostname}"


def worker_heartbeat_pattern(prefix: str) -> str:
    return f"{prefix}:worker:*"


def ready_probe(prefix: str) -> str:
    """Written by `/ready` with a short TTL: a Redis that answers PING may still refuse
    writes (a read-only replica after a failover, or maxmemory reached)."""
    return f"{prefix}:ready_probe"
