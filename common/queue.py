"""The Celery configuration both sides share.

The webhook only *sends* tasks, by name, through a Celery app built here, so it never
imports the worker package (and with it torch). The worker builds its app from the same
function and registers the tasks.

Flower and the worker's logs show a task's arguments from the `argsrepr`/`kwargsrepr` its
message carries, so every message names the session masked: the senders below set them,
and the apps' task class sets them on whatever else publishes a task (`apply_async`, and
Celery's own retries, which would otherwise show the raw arguments).
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Any
from uuid import uuid4

from celery import Celery, Task
from celery.utils.nodenames import anon_nodename
from kombu.serialization import dumps

from common.broker import transport_for
from common.privacy import mask_task_args, mask_task_kwargs
from common.settings import Settings

REPLY_TASK = "worker.reply_to_session"
DELIVER_TASK = "worker.deliver_reply"

# What differs between two reply task messages (ReplyTaskMessages).
_SLOTS = ("task_id", "argsrepr", "delivery_tag", "body")
_ARG_MARKER = "<session-id>"


def send_reply_task(
    app: Celery, session_id: str, countdown: float | None = None, **options: Any
) -> None:
    """Queue a reply for a session; flower and logs see the session masked."""
    app.send_task(
        REPLY_TASK,
        args=[session_id],
        argsrepr=mask_task_args([session_id]),
        countdown=countdown or None,
        **options,
    )


def _random_uuid() -> str:
    """A version-4 UUID as text, as `str(uuid.uuid4())` writes it, without building a
    `UUID` object (6 µs of the webhook's request on a slow core)."""
    h = os.urandom(16).hex()
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}"


class ReplyTaskMessages:
    """Builds the reply task exactly as Celery and kombu's Redis transport would LPUSH it.

    The webhook pushes it from its accept script, so storing a message and queueing its
    task are one atomic round trip, with no kombu publish in the request (that path was
    ~44% of the webhook's CPU, bench/HISTORY.md). Celery builds the task message (protocol
    2: headers, properties, body) once per process, and it is serialised once, with a
    marker in each place that differs per message; each message then only fills in its
    ids, masked session and body (10 to 19 µs where serialising the whole envelope took
    54 to 57, on the slower benchmark machine). The envelope around it is the one kombu's
    virtual transport writes for the anonymous exchange. `tests/test_queue.py` compares it
    with what `send_task` writes, and every end-to-end test has a real worker consume it.
    """

    def __init__(self, app: Celery) -> None:
        self._app = app
        self._built_in_pid: int | None = None  # `origin` names the process: rebuild after fork

    def _template(self) -> None:
        task = self._app.amqp.as_task_v2(
            "",
            REPLY_TASK,
            args=[],
            kwargs={},
            kwargsrepr="{}",
            origin=anon_nodename(),
            ignore_result=True,  # replies travel by callback (task_ignore_result)
        )
        queue = self._app.conf.task_default_queue
        marker = {slot: f"<{slot}:{uuid4().hex}>" for slot in _SLOTS}
        envelope = {
            "body": marker["body"],
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                **task.headers,
                "id": marker["task_id"],
                "root_id": marker["task_id"],
                "argsrepr": marker["argsrepr"],
            },
            "properties": {
                **task.properties,
                "correlation_id": marker["task_id"],
                "delivery_mode": 2,  # persistent, Celery's default for task queues
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": marker["delivery_tag"],
            },
        }
        # Literal JSON and slot names alternate: even items are text, odd items slots.
        by_marker = {json.dumps(text): slot for slot, text in marker.items()}
        pattern = "|".join(re.escape(m) for m in by_marker)
        self._pieces = [
            by_marker.get(piece, piece) for piece in re.split(f"({pattern})", json.dumps(envelope))
        ]
        content_type, encoding, body = dumps(([_ARG_MARKER], {}, task.body[2]), serializer="json")
        if (content_type, encoding) != ("application/json", "utf-8"):
            raise RuntimeError(f"unexpected task serialisation {content_type}, {encoding}")
        self._body_around_arg = body.split(json.dumps(_ARG_MARKER))
        self._built_in_pid = os.getpid()

    def build(self, session_id: str) -> str:
        if self._built_in_pid != os.getpid():
            self._template()
        task_id = json.dumps(_random_uuid())
        before, after = self._body_around_arg
        body = before + json.dumps(session_id) + after
        values = {
            "task_id": task_id,
            "argsrepr": json.dumps(mask_task_args([session_id])),
            "delivery_tag": json.dumps(_random_uuid()),
            "body": json.dumps(base64.b64encode(body.encode()).decode()),
        }
        return "".join(
            piece if i % 2 == 0 else values[piece] for i, piece in enumerate(self._pieces)
        )


def send_delivery_task(
    app: Celery, session_id: str, idempotency_key: str, countdown: float
) -> None:
    """Queue a later delivery attempt of a reply waiting in the session outbox."""
    app.send_task(
        DELIVER_TASK,
        args=[session_id, idempotency_key],
        argsrepr=mask_task_args([session_id, idempotency_key]),
        countdown=countdown or None,
    )


class MaskedArgsTask(Task):
    """Task class of the apps built here: every message it sends shows the session masked.

    `retry` (also the one `autoretry_for` calls) rebuilds the message from the request and
    drops the masked reprs the first send carried; it sends through `apply_async`, so
    filling them in here covers retries, `delay` and signatures alike.
    """

    def apply_async(self, args=None, kwargs=None, *rest: Any, **options: Any):  # type: ignore[override]
        options["argsrepr"] = mask_task_args(args)
        options["kwargsrepr"] = mask_task_kwargs(kwargs)
        return super().apply_async(args, kwargs, *rest, **options)


def make_celery(settings: Settings, main: str = "worker") -> Celery:
    app = Celery(main, task_cls=MaskedArgsTask)
    app.conf.update(
        broker_url=settings.effective_broker_url,
        broker_transport=transport_for(settings.effective_broker_url),
        # Replies travel by callback; task results would only fill Redis.
        result_backend=None,
        task_ignore_result=True,
        task_default_queue=settings.task_queue,
        task_serializer="json",
        accept_content=["json"],
        # At-least-once: a task is acknowledged after it ran, and handed back if the
        # process running it dies. The session inbox makes the re-run harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        # A replacement child loads the model before it says it is up; Celery's default
        # of 4 s would kill it in a loop.
        worker_proc_alive_timeout=settings.worker_start_timeout_seconds,
        broker_transport_options={
            # Longer than the longest task and the longest retry countdown, so neither a
            # slow task nor a scheduled retry is redelivered while it is still owned.
            "visibility_timeout": max(
                settings.task_time_limit * 2, settings.callback_max_backoff_seconds
            )
            + 60,
            "socket_timeout": settings.redis_socket_timeout * 5,
            "socket_connect_timeout": settings.redis_socket_timeout,
        },
        broker_connection_retry_on_startup=True,
        # Task events (received, started, succeeded) cost a worker ~0.5 ms per task
        # (bench/HISTORY.md, section 2), so they are sent only once a monitor asks: flower
        # broadcasts `enable_events` at start and every 5 s after. WORKER_TASK_EVENTS
        # sends them always, for monitors that only listen. The webhook's own "sent"
        # event would cost every accepted message another publish (13% of the webhook's
        # throughput) for a state flower shows for a few milliseconds.
        worker_send_task_events=settings.worker_task_events,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
    )
    return app
