"""What one worker process builds once and reuses: Redis client, HTTP session, responder.

Created lazily on first use, which in a prefork child is after the fork, so no socket is
shared between processes. The model itself is loaded at process start (see worker.app).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import redis

from common.conversation_store import ConversationStore
from common.inbox import Inbox
from common.queue import send_delivery_task, send_reply_task
from common.redis_client import connect
from common.settings import get_settings
from worker.callback import CallbackClient
from worker.context import Turn
from worker.delivery import Delivery
from worker.metrics import GENERATED_TOKENS, GENERATION_SECONDS, REPLIES
from worker.outbox import DeadLetters, Outbox
from worker.responder import Responder
from worker.session_lock import LockRenewer, SessionLocks


def _generate(turns: Sequence[Turn]) -> str:
    from worker.model import get_model  # torch stays out of processes that never generate

    with GENERATION_SECONDS.time():
        generated = get_model().reply(turns)
    GENERATED_TOKENS.inc(generated.new_tokens)
    REPLIES.labels("fallback" if generated.used_fallback else "model").inc()
    return generated.text


def schedule_delivery(session_id: str, idempotency_key: str, delay: float) -> None:
    from worker.app import app

    send_delivery_task(app, session_id, idempotency_key, delay)


def requeue_session(session_id: str, delay: float = 0) -> None:
    from worker.app import app

    send_reply_task(app, session_id, countdown=delay)


@lru_cache(maxsize=1)
def redis_client() -> redis.Redis:
    return connect(get_settings())


@lru_cache(maxsize=1)
def delivery() -> Delivery:
    settings = get_settings()
    client = redis_client()
    return Delivery(
        client=CallbackClient.from_settings(settings),
        outbox=Outbox(client),
        dead_letters=DeadLetters(client, settings.key_prefix),
        settings=settings,
        schedule=schedule_delivery,
    )


@lru_cache(maxsize=1)
def responder() -> Responder:
    settings = get_settings()
    client = redis_client()
    return Responder(
        client=client,
        settings=settings,
        inbox=Inbox(client, settings),
        store=ConversationStore(client, settings),
        generate=_generate,
        deliver=delivery().attempt,
        requeue=requeue_session,
        model_name=settings.model_name,
        locks=SessionLocks(client, settings.lock_timeout_seconds, LockRenewer()),
    )
