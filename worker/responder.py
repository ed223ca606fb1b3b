"""Answering one conversation: lock, claim, generate, commit, deliver, look again.

Plain code with its collaborators passed in, so it runs the same under Celery and in a
test. The guarantees of DESIGN.md live here:
- one generation at a time per session (a Redis lock with a token and an expiry);
- everything pending is answered together as one user turn (the claim takes it all);
- a message that arrives while the lock is held is never stranded: the webhook queues no
  task for it, so the holder claims it in the step that would release the lock (keeping
  the lock for one more round) or, where it releases first, counts it in the release and
  looks again; a task queued just before the lock was taken finds it taken and leaves.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

import redis

from common.conversation_store import ConversationStore, StoredConversation, new_conversation_id
from common.inbox import Batch, Inbox, LockedClaim
from common.keys import SessionKeys, session_keys
from common.messages import (
    CallbackPayload,
    OutboxEntry,
    PendingMessage,
    StoredMessage,
    utc_now_iso,
)
from common.privacy import mask_phone
from common.settings import Settings
from worker.context import Turn, merge_turns
from worker.metrics import REPLIES
from worker.session_lock import SessionLocks

log = logging.getLogger(__name__)

# A busy conversation is answered in a few rounds per task, then handed to a fresh task,
# so one task never runs into its time limit.
MAX_ROUNDS_PER_TASK = 4

Generate = Callable[[Sequence[Turn]], str]
Deliver = Callable[[OutboxEntry], bool]
Requeue = Callable[[str, float], None]  # session id, countdown in seconds


def idempotency_key(session_id: str, message_ids: Sequence[str]) -> str:
    """Same messages → same key, on every retry and redelivery, so n8n can drop repeats."""
    digest = hashlib.sha256("\n".join([session_id, *message_ids]).encode()).hexdigest()
    return digest[:32]


def trim_reply(text: str, limit: int) -> str:
    """Keep a reply within WhatsApp's limit, cutting at a word boundary with an ellipsis."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space >= limit // 2:
        cut = cut[:space]
    return cut.rstrip() + "…"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


@dataclass
class _ClaimOnAcquire:
    """An `Acquire` for `SessionLocks.hold` that also claims and reads the history."""

    inbox: Inbox
    keys: SessionKeys
    claim: LockedClaim | None = None

    def __call__(self, token: str, ttl_ms: int) -> bool:
        self.claim = self.inbox.lock_and_claim(self.keys, token, ttl_ms)
        return self.claim is not None


@dataclass
class Responder:
    client: redis.Redis
    settings: Settings
    inbox: Inbox
    store: ConversationStore
    generate: Generate
    deliver: Deliver
    requeue: Requeue
    model_name: str
    locks: SessionLocks

    def answer(self, session_id: str) -> int:
        """Answer what is pending for a session; the number of replies made."""
        keys = session_keys(self.settings.key_prefix, session_id)
        replies = rounds = 0
        while rounds < MAX_ROUNDS_PER_TASK:
            claiming = _ClaimOnAcquire(self.inbox, keys)
            # Without debounce there is nothing to decide between lock and claim: one step.
            acquire = claiming if self.settings.debounce_seconds <= 0 else None
            with self.locks.hold(keys, acquire) as hold:
                if not hold.acquired:
                    return replies  # the holder will see our messages after it releases
                claim = claiming.claim
                while True:
                    rounds += 1
                    batch = (
                        claim.batch
                        if claim is not None
                        else self._claim_unless_typing(session_id, keys)
                    )
                    if batch is None:
                        return replies  # requeued to answer once the user stops typing
                    if batch:
                        self._answer_batch(session_id, keys, batch, claim)
                        replies += 1
                    if claim is None or rounds == MAX_ROUNDS_PER_TASK:
                        break
                    # Messages accepted while we hold the lock get no task of their own
                    # (the webhook leaves them to the holder): claim them without letting
                    # go, or release with nothing waiting.
                    claim = self.locks.end_round(
                        hold, partial(self.inbox.claim_more_or_release, keys)
                    )
                    if claim is None:
                        break
            # Released with what waited counted in the same step: look again if anything did.
            waiting = hold.waiting if hold.waiting is not None else self.inbox.has_pending(keys)
            if not waiting:
                return replies
        self.requeue(session_id, 0)
        return replies

    def _claim_unless_typing(self, session_id: str, keys: SessionKeys) -> Batch | None:
        """The claim of a round that took the lock alone (debounce on): None, with the
        session requeued, while the debounce window is still open."""
        wait = self._debounce_wait(keys)
        if wait > 0:
            self.requeue(session_id, wait)
            return None
        return self.inbox.claim(keys)

    def _debounce_wait(self, keys: SessionKeys) -> float:
        """Seconds to wait for the user to stop typing (0: answer now).

        Waits while the newest message is younger than DEBOUNCE_SECONDS, but never past
        DEBOUNCE_MAX_WAIT_SECONDS after the oldest; a claim left by a crash never waits.
        """
        s = self.settings
        if s.debounce_seconds <= 0:
            return 0.0
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(keys.processing)
        pipe.lindex(keys.inbox, 0)
        pipe.lindex(keys.inbox, -1)
        in_processing, oldest, newest = pipe.execute()
        if in_processing or oldest is None:
            return 0.0
        now = time.time()
        quiet_left = s.debounce_seconds - (
            now - PendingMessage.model_validate_json(newest).received_at
        )
        cap_left = s.debounce_max_wait_seconds - (
            now - PendingMessage.model_validate_json(oldest).received_at
        )
        return max(0.0, min(quiet_left, cap_left))

    def _reply_text(
        self, history: StoredConversation | None, batch: Batch
    ) -> tuple[str, list[PendingMessage]]:
        """The reply for a batch and the messages to store (`history` None: start afresh).

        A reset command forgets everything before it (in history and in the batch); what
        follows it in the batch starts the new conversation. Messages we cannot read
        (images, audio…) get the fixed NON_TEXT_REPLY unless text came with them.
        """
        s = self.settings
        messages = batch.messages
        resets = [i for i, m in enumerate(messages) if m.kind == "reset"]
        after_reset = messages[resets[-1] + 1 :] if resets else messages
        texts = [m for m in after_reset if m.kind == "text"]
        if texts:
            earlier = history.turns if history is not None else []
            turns = merge_turns(
                [(m["role"], m["content"]) for m in earlier] + [("user", m.text) for m in texts]
            )
            text = self.generate(turns)
        elif resets and not after_reset:
            text = s.reset_reply
            REPLIES.labels("fixed").inc()
        else:
            text = s.non_text_reply
            REPLIES.labels("fixed").inc()
        return trim_reply(text, s.max_reply_chars), after_reset

    def _answer_batch(
        self, session_id: str, keys: SessionKeys, batch: Batch, claim: LockedClaim | None
    ) -> None:
        """`claim`: the history read with the batch, if it was (else it is loaded here)."""
        fresh = any(m.kind == "reset" for m in batch.messages)
        if fresh:
            history = None
        elif claim is not None:
            history = ConversationStore.from_claim(claim)
        else:
            history = self.store.load(keys)
        reply_text, kept = self._reply_text(history, batch)
        now = utc_now_iso()
        ids = [m.message_id for m in batch.messages]
        key = idempotency_key(session_id, ids)
        last = batch.messages[-1]
        started = int(batch.messages[0].received_at)
        conversation_id = (history and history.conversation_id) or new_conversation_id(
            last.sender, started
        )
        stored = [
            StoredMessage(
                message_id=m.message_id,
                role="user",
                content=m.text,
                timestamp=_iso(m.received_at),
                metadata=m.metadata,
            )
            for m in kept
        ]
        stored.append(
            StoredMessage(
                message_id=f"reply_{key}",
                role="assistant",
                content=reply_text,
                timestamp=now,
                metadata={"model": self.model_name, "in_reply_to": ids},
            )
        )
        payload = CallbackPayload(
            to=last.sender,
            session_id=session_id,
            reply=reply_text,
            in_reply_to=ids,
            conversation_id=conversation_id,
            metadata=last.metadata,
            model=self.model_name,
            generated_at=now,
            latency_ms=int((time.time() - batch.messages[0].received_at) * 1000),
        )
        url = last.callback_url or str(self.settings.n8n_callback_url or "")
        entry = None
        if url:
            entry = OutboxEntry(
                session_id=session_id,
                idempotency_key=key,
                url=url,
                payload=payload,
                created_at=time.time(),
                next_attempt_at=time.time(),
            )
        else:
            log.error("no callback URL for reply %s; set N8N_CALLBACK_URL", key)
        committed = self.store.commit(
            keys,
            batch,
            conversation_id=conversation_id,
            user_id=last.sender,
            messages=stored,
            metadata={"name": last.name} if last.name else {},
            now=now,
            outbox=entry,
            fresh=fresh,
        )
        if not committed:
            log.warning("claim of session was taken over; reply dropped, not doubled")
            return
        if entry is None:
            callback = "none"
        else:
            # A failed first attempt logs its own line (retry scheduled, or dead letter).
            callback = "delivered" if self.deliver(entry) else "not delivered"
        log.info(
            "replied to=%s messages=%d latency_ms=%d callback %s %s",
            mask_phone(last.sender),
            len(batch.messages),
            payload.latency_ms,
            key,
            callback,
        )
