"""The one place that owns the webhook's Redis client and task producer.

Routes call `services()`; nothing opens its own connection. redis-py connects lazily, so
building these at start-up costs nothing and does not fail when Redis is down.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from celery import Celery
from flask import Flask, current_app

from common.callback_hosts import CallbackHostPolicy
from common.conversation_store import ConversationStore
from common.inbox import Inbox
from common.queue import ReplyTaskMessages, make_celery
from common.redis_client import connect
from common.settings import Settings

_EXTENSION = "whatsapp_reply"

# A publish that cannot reach the broker should fail fast into a 503, not stall n8n.
PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2}


@dataclass(frozen=True)
class Services:
    settings: Settings
    redis: redis.Redis
    inbox: Inbox
    store: ConversationStore
    celery: Celery
    callback_hosts: CallbackHostPolicy
    # The broker is the conversations' Redis: queue the task inside the accept script,
    # built by `reply_tasks`.
    queue_in_accept: bool
    reply_tasks: ReplyTaskMessages


def init_app(app: Flask, settings: Settings) -> None:
    client = connect(settings)
    celery = make_celery(settings, main="webhook")
    app.extensions[_EXTENSION] = Services(
        settings=settings,
        redis=client,
        inbox=Inbox(client, settings),
        store=ConversationStore(client, settings),
        celery=celery,
        callback_hosts=CallbackHostPolicy(settings),
        queue_in_accept=settings.effective_broker_url == settings.redis_url,
        reply_tasks=ReplyTaskMessages(celery),
    )


def services() -> Services:
    return current_app.extensions[_EXTENSION]
