"""The callback policy: try now; on a retryable failure schedule a later attempt; when
attempts or age run out, move the reply to the dead letters.

Later attempts are separate Celery tasks with a countdown, so waiting for n8n never
blocks a worker. The reply stays in its session's outbox until it is delivered or dead
(the outbox's expiry outlives the longest delivery, see
`common.conversation_store.outbox_ttl_seconds`), and the idempotency key travels with it
unchanged. A reply whose attempts were all lost is dead-lettered by the recovery sweep
once it is older than CALLBACK_MAX_AGE_SECONDS.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from common.keys import session_keys
from common.messages import OutboxEntry
from common.settings import Settings
from worker.callback import CallbackClient, CallbackError, backoff_seconds
from worker.metrics import CALLBACKS
from worker.outbox import DeadLetters, Outbox, move_to_dead_letters

log = logging.getLogger(__name__)

# (session id, idempotency key, delay in seconds)
Schedule = Callable[[str, str, float], None]


@dataclass
class Delivery:
    client: CallbackClient
    outbox: Outbox
    dead_letters: DeadLetters
    settings: Settings
    schedule: Schedule
    clock: Callable[[], float] = time.time

    def attempt(self, entry: OutboxEntry) -> bool:
        """One attempt at delivering an outbox entry; True if n8n accepted it."""
        keys = session_keys(self.settings.key_prefix, entry.session_id)
        entry = entry.model_copy(update={"attempts": entry.attempts + 1})
        try:
            self.client.post(entry.url, entry.payload, entry.idempotency_key)
        except CallbackError as exc:
            now = self.clock()
            entry = entry.model_copy(update={"last_error": str(exc)})
            if exc.retryable and self._may_retry(entry, now):
                delay = backoff_seconds(
                    entry.attempts - 1,
                    base=self.settings.callback_retry_backoff_seconds,
                    cap=self.settings.callback_max_backoff_seconds,
                    retry_after=exc.retry_after,
                )
                entry = entry.model_copy(update={"next_attempt_at": now + delay})
                if self.outbox.update(keys, entry):
                    CALLBACKS.labels("retry").inc()
                    log.warning(
                        "callback %s attempt %d failed (%s); retrying in %.1fs",
                        entry.idempotency_key,
                        entry.attempts,
                        exc,
                        delay,
                    )
                    self.schedule(entry.session_id, entry.idempotency_key, delay)
            else:
                # Dead letter first, then leave the outbox: a crash in between keeps both,
                # never neither (see worker.outbox). Gone already: another attempt settled it.
                letter = entry.model_copy(update={"failed_at": now})
                if not move_to_dead_letters(self.outbox, self.dead_letters, keys, letter):
                    return False
                CALLBACKS.labels("dead").inc()
                log.error(
                    "callback %s dead after %d attempt(s): %s",
                    entry.idempotency_key,
                    entry.attempts,
                    exc,
                )
            return False
        self.outbox.remove(keys, entry.idempotency_key)
        CALLBACKS.labels("delivered").inc()
        if entry.attempts > 1:  # a first attempt is on the responder's "replied" line
            log.info("callback %s delivered on attempt %d", entry.idempotency_key, entry.attempts)
        return True

    def attempt_pending(self, session_id: str, idempotency_key: str) -> bool:
        """A scheduled attempt: deliver the entry if it is still waiting."""
        keys = session_keys(self.settings.key_prefix, session_id)
        entry = self.outbox.get(keys, idempotency_key)
        if entry is None:
            return False  # delivered or dead meanwhile: nothing to repeat
        return self.attempt(entry)

    def _may_retry(self, entry: OutboxEntry, now: float) -> bool:
        s = self.settings
        retries_made = entry.attempts - 1
        return retries_made < s.callback_max_retries and (
            now - entry.created_at < s.callback_max_age_seconds
        )
