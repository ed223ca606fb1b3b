"""Webhook variants for experiments: the real app with one thing changed at run time, to
measure what a change bought (by undoing it) without touching production code.

    gunicorn -c gunicorn.conf.py 'bench.variants:webhook_with_two_log_lines()'

Worker-side variants are functions the benchmarks patch in (bench.instant_worker,
bench.reply_round).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import redis
from flask import Flask, Response

from common import inbox as inbox_module
from common.conversation_store import history_json
from common.inbox import Inbox, LockedClaim
from common.keys import SessionKeys
from webhook import create_app


def webhook_with_sent_events() -> Flask:
    """The webhook with Celery's task-sent event on, the default before common.queue turned
    it off: each accepted message costs one more event serialisation and PUBLISH."""
    app = create_app()
    app.extensions["whatsapp_reply"].celery.conf.task_send_sent_event = True
    return app


def webhook_with_two_log_lines() -> Flask:
    """The webhook writing a second INFO line per accepted message, as it did before the
    access line carried what was queued (same logger set-up, a line of the same size)."""
    app = create_app()
    log = logging.getLogger("webhook.intake")

    def second_line(response: Response) -> Response:
        if response.status_code == 202:
            log.info("queued message_id=%s from=%s kind=text pending=%d", "wamid.x" * 4,
                     "+591****5678", 1)  # fmt: skip
        return response

    app.after_request(second_line)
    return app


def lock_then_claim(
    inbox: Inbox, keys: SessionKeys, token: str, lock_ttl_ms: int
) -> LockedClaim | None:
    """`Inbox.lock_and_claim` in three round trips (SET NX PX, the claim, the history), as
    the responder took the lock, claimed and loaded before the three became one script."""
    if not inbox._client.set(keys.lock, token, nx=True, px=lock_ttl_ms):
        return None
    batch = inbox.claim(keys)
    pipe = inbox._client.pipeline(transaction=False)
    pipe.lrange(keys.messages, 0, -1)
    pipe.hget(keys.conversation, "conversation_id")
    history, conversation_id = pipe.execute()
    return LockedClaim(batch, history_json(history), conversation_id)


# `common.inbox._LOCK_AND_CLAIM` as it was before it joined the history into one string.
_LOCK_AND_CLAIM_HISTORY_AS_LIST = inbox_module._LOCK_AND_CLAIM.replace(
    "local history = '[' .. table.concat(redis.call('LRANGE', KEYS[4], 0, -1), ',') .. ']'",
    "local history = redis.call('LRANGE', KEYS[4], 0, -1)",
)
assert _LOCK_AND_CLAIM_HISTORY_AS_LIST != inbox_module._LOCK_AND_CLAIM, "script changed: update"
_as_before: dict[int, Inbox] = {}
_lock_and_claim = Inbox.lock_and_claim  # as imported: the reply_round variants patch it


def lock_and_claim_history_as_list(
    inbox: Inbox, keys: SessionKeys, token: str, lock_ttl_ms: int
) -> LockedClaim | None:
    """`Inbox.lock_and_claim` running that script: redis-py parses and decodes the history
    one item per stored message, and Python joins them, as before."""
    before = _as_before.get(id(inbox))
    if before is None:
        as_list = inbox._client.register_script(_LOCK_AND_CLAIM_HISTORY_AS_LIST)

        def joined(keys: list[str], args: list[object]) -> list[object] | None:
            found = as_list(keys=keys, args=args)
            return found and [found[0], history_json(found[1]), found[2]]

        before = _as_before[id(inbox)] = copy.copy(inbox)
        before._lock_and_claim = joined  # type: ignore[assignment]
    return _lock_and_claim(before, keys, token, lock_ttl_ms)


@contextmanager
def python_redis_protocol() -> Iterator[None]:
    """Redis clients built inside use redis-py's pure-Python protocol code, as when hiredis
    is not installed (before requirements.txt asked for `redis[hiredis]`): hiredis both
    parses replies and packs commands when it is there."""
    from redis._parsers import _RESP2Parser
    from redis.connection import PythonRespSerializer

    class PythonConnection(redis.Connection):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(parser_class=_RESP2Parser, **kwargs)
            self._command_packer = PythonRespSerializer(self._buffer_cutoff, self.encoder.encode)

    from_url = redis.Redis.from_url

    def python_protocol(url: str, **kwargs: Any) -> redis.Redis:
        return from_url(url, connection_class=PythonConnection, **kwargs)

    with mock.patch.object(redis.Redis, "from_url", python_protocol):
        yield


def webhook_with_python_redis_parser() -> Flask:
    """The webhook without hiredis (`python_redis_protocol`)."""
    with python_redis_protocol():
        return create_app()
