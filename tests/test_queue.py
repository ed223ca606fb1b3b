"""The reply task the webhook queues from its accept script is the one Celery would send."""

from __future__ import annotations

import base64
import json
import uuid

from common.inbox import Inbox, QueuedTask
from common.keys import session_keys
from common.messages import PendingMessage
from common.privacy import mask_phone
from common.queue import (
    REPLY_TASK,
    ReplyTaskMessages,
    _random_uuid,
    make_celery,
    send_reply_task,
)

SESSION = "+59170000002"
# Fields that differ between any two messages (ids, tags) or only say who sent it.
PER_MESSAGE = {"id", "root_id", "origin", "correlation_id", "delivery_tag", "reply_to"}


def without(fields: dict, drop: set[str]) -> dict:
    return {key: value for key, value in fields.items() if key not in drop}


def test_built_message_matches_what_send_task_writes(settings, redis_client):
    app = make_celery(settings, main="webhook")
    send_reply_task(app, SESSION)
    [sent] = [json.loads(raw) for raw in redis_client.lrange(settings.task_queue, 0, -1)]
    built = json.loads(ReplyTaskMessages(app).build(SESSION))

    assert set(built) == set(sent)
    assert built["body"] == sent["body"]  # args, kwargs and embed, base64 as kombu does
    assert json.loads(base64.b64decode(built["body"]))[0] == [SESSION]
    assert (built["content-type"], built["content-encoding"]) == (
        sent["content-type"],
        sent["content-encoding"],
    )
    # send_task leaves ignore_result unset (null); ours says what the app does: ignore.
    assert without(built["headers"], PER_MESSAGE | {"ignore_result"}) == without(
        sent["headers"], PER_MESSAGE | {"ignore_result"}
    )
    assert built["headers"]["task"] == REPLY_TASK
    assert built["headers"]["argsrepr"] == "['+591****0002']"
    assert built["headers"]["id"] == built["headers"]["root_id"]
    assert built["properties"]["correlation_id"] == built["headers"]["id"]
    # send_task also copies argsrepr into the properties, which nothing reads.
    assert without(built["properties"], PER_MESSAGE) == without(
        sent["properties"], PER_MESSAGE | {"argsrepr"}
    )


def test_each_message_has_its_own_task_id(settings):
    app = make_celery(settings, main="webhook")
    messages = ReplyTaskMessages(app)
    first, second = (json.loads(messages.build(SESSION)) for _ in range(2))
    assert first["headers"]["id"] != second["headers"]["id"]
    assert first["properties"]["delivery_tag"] != second["properties"]["delivery_tag"]


def message(n: int) -> PendingMessage:
    return PendingMessage(message_id=f"q{n}", session_id=SESSION, sender=SESSION, text="hola")


def test_accept_queues_the_task_only_when_it_stores_the_message(settings, redis_client):
    keys = session_keys(settings.key_prefix, SESSION)
    inbox = Inbox(redis_client, settings.model_copy(update={"max_pending_per_session": 2}))
    task = QueuedTask(settings.task_queue, '{"task": 1}')

    assert inbox.accept(keys, message(1), task).status == "queued"
    assert redis_client.lrange(settings.task_queue, 0, -1) == ['{"task": 1}']
    assert inbox.accept(keys, message(1), task).status == "duplicate"
    assert inbox.accept(keys, message(2), task).status == "queued"
    assert inbox.accept(keys, message(3), task).status == "inbox_full"
    assert redis_client.llen(settings.task_queue) == 2
    assert redis_client.llen(keys.inbox) == 2


def test_accept_without_a_task_queues_nothing(settings, redis_client):
    keys = session_keys(settings.key_prefix, SESSION)
    assert Inbox(redis_client, settings).accept(keys, message(1)).status == "queued"
    assert redis_client.llen(settings.task_queue) == 0


def test_a_message_for_a_held_session_is_stored_but_gets_no_task(settings, redis_client):
    # The holder looks at the inbox after releasing the lock; a task would only find the
    # lock taken and leave.
    keys = session_keys(settings.key_prefix, SESSION)
    inbox = Inbox(redis_client, settings)
    task = QueuedTask(settings.task_queue, '{"task": 1}')
    redis_client.set(keys.lock, "holder-token", px=30_000)

    held = inbox.accept(keys, message(1), task)
    assert (held.status, held.pending, held.needs_task) == ("queued", 1, False)
    assert redis_client.llen(settings.task_queue) == 0
    assert redis_client.llen(keys.inbox) == 1

    redis_client.delete(keys.lock)
    free = inbox.accept(keys, message(2), task)
    assert (free.status, free.pending, free.needs_task) == ("queued", 2, True)
    assert redis_client.lrange(settings.task_queue, 0, -1) == ['{"task": 1}']


def test_task_events_wait_for_a_monitor_unless_asked_for(make_settings):
    assert make_celery(make_settings()).conf.worker_send_task_events is False
    always = make_celery(make_settings(worker_task_events=True))
    assert always.conf.worker_send_task_events is True


def test_a_session_id_json_must_escape_reaches_the_task_intact(settings):
    session = 'wa"\\ses\u00f1ión/1'
    built = json.loads(ReplyTaskMessages(make_celery(settings, main="webhook")).build(session))
    assert json.loads(base64.b64decode(built["body"]))[0] == [session]
    assert built["headers"]["argsrepr"] == repr([mask_phone(session)])


def test_task_ids_are_version_4_uuids():
    ids = {_random_uuid() for _ in range(200)}
    assert len(ids) == 200
    for text in ids:
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)
