"""Flower and the worker's logs show a task's arguments from the message's `argsrepr` and
`kwargsrepr`: the session id (a phone number) must be masked there on the first send and
on every retry Celery sends by itself.

The messages go through a real Redis broker; a retry is produced the way a worker produces
it: the queued message is taken from Redis, run by Celery's own `Request.execute` (the
task fails, `autoretry_for` calls `retry`), and the retry message it publishes is read back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from kombu.message import Message

from common.privacy import mask_phone
from common.queue import make_celery, send_delivery_task, send_reply_task
from common.settings import Settings

SESSION = "+59112345678"
MASKED = mask_phone(SESSION)


@pytest.fixture
def app(settings: Settings, redis_client: redis.Redis) -> Iterator[Celery]:
    app = make_celery(settings, main="privacy-test")
    calls: list[str] = []
    name = f"test.flaky_reply.{settings.task_queue}"  # task names must be unique

    # The options of worker.tasks.reply_to_session, with a body that always fails.
    @app.task(
        name=name,
        autoretry_for=(RuntimeError,),
        max_retries=3,
        retry_backoff=2,
        retry_backoff_max=60,
        retry_jitter=True,
    )
    def flaky_reply(session_id: str) -> int:
        calls.append(session_id)
        raise RuntimeError("model not ready")

    app.flaky = flaky_reply  # type: ignore[attr-defined]
    app.flaky_calls = calls  # type: ignore[attr-defined]
    yield app
    app.close()
    redis_client.delete(f"_kombu.binding.{settings.task_queue}")


def take(app: Celery, queue: str) -> Message:
    """The next message of the queue, as a worker would receive it."""
    with app.connection_for_read() as connection:
        message = connection.default_channel.basic_get(queue, no_ack=True)
    assert message is not None, f"no message in {queue}"
    return message


def assert_masked(message: Message) -> None:
    headers = message.headers
    shown = headers["argsrepr"] + headers["kwargsrepr"]
    assert MASKED in shown, shown
    assert SESSION not in json.dumps(headers), headers
    assert SESSION not in json.dumps(message.properties, default=str)
    # The task itself still gets the real session id.
    args, kwargs, _ = message.decode()
    assert SESSION in [*args, *kwargs.values()]


def run_like_a_worker(app: Celery, message: Message) -> None:
    from celery.worker.request import Request

    task = app.tasks[message.headers["task"]]
    Request(message, app=app, task=task, hostname="privacy-test@host").execute()


def test_first_send_of_each_task_is_masked(app: Celery, settings: Settings) -> None:
    send_reply_task(app, SESSION)
    assert_masked(take(app, settings.task_queue))

    send_delivery_task(app, SESSION, "idem-1", countdown=0)
    message = take(app, settings.task_queue)
    assert_masked(message)
    assert "idem-1" in message.headers["argsrepr"]


def test_an_autoretry_keeps_the_session_masked(app: Celery, settings: Settings) -> None:
    app.send_task(app.flaky.name, args=[SESSION], argsrepr=repr([MASKED]))
    first = take(app, settings.task_queue)
    assert_masked(first)

    run_like_a_worker(app, first)

    assert app.flaky_calls == [SESSION]
    retry = take(app, settings.task_queue)
    assert retry.headers["retries"] == 1
    assert retry.headers["id"] == first.headers["id"]
    assert_masked(retry)

    # And the retry of the retry.
    run_like_a_worker(app, retry)
    again = take(app, settings.task_queue)
    assert again.headers["retries"] == 2
    assert_masked(again)


def test_apply_async_without_a_repr_is_masked(app: Celery, settings: Settings) -> None:
    app.flaky.apply_async(args=[SESSION])
    assert_masked(take(app, settings.task_queue))

    app.flaky.apply_async(kwargs={"session_id": SESSION})
    message = take(app, settings.task_queue)
    assert_masked(message)
    assert MASKED in message.headers["kwargsrepr"]


def test_the_worker_app_tasks_use_the_masking_base() -> None:
    from common.queue import MaskedArgsTask

    app = make_celery(Settings(_env_file=None), main="privacy-base")
    try:
        assert issubclass(app.Task, MaskedArgsTask)
    finally:
        app.close()
