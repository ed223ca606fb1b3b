"""The Celery tasks: thin wrappers over the responder and the delivery policy."""

from __future__ import annotations

from common.queue import DELIVER_TASK, REPLY_TASK
from common.settings import get_settings
from worker import runtime
from worker.app import app


@app.task(
    name=REPLY_TASK,
    # A failed generation leaves its batch in the session's processing list; the retry
    # claims that same batch again, so the answer keeps its idempotency key.
    autoretry_for=(Exception,),
    max_retries=get_settings().task_max_retries,
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
)
def reply_to_session(session_id: str) -> int:
    """Answer everything pending for one conversation (queued for an accepted message
    unless a worker was already answering that conversation)."""
    return runtime.responder().answer(session_id)


@app.task(name=DELIVER_TASK)
def deliver_reply(session_id: str, idempotency_key: str) -> bool:
    """A scheduled attempt at delivering a reply still waiting in its session's outbox."""
    return runtime.delivery().attempt_pending(session_id, idempotency_key)
