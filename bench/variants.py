"""Webhook variants for experiments: the real app with one thing changed at run time, to
measure what a change bought (by undoing it) without touching production code.

    gunicorn -c gunicorn.conf.py 'bench.variants:webhook_with_two_log_lines()'

Worker-side variants are functions the benchmarks patch in (bench.instant_worker,
bench.reply_round).
"""

from __future__ import annotations

import logging

from flask import Flask, Response
from redis.commands.core import Script

from common import inbox as inbox_module
from common.conversation_store import history_json
from common.inbox import Inbox, LockedClaim, _batch
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
_registered: dict[int, Script] = {}


def lock_and_claim_history_as_list(
    inbox: Inbox, keys: SessionKeys, token: str, lock_ttl_ms: int
) -> LockedClaim | None:
    """`Inbox.lock_and_claim` with the history read as one reply item per stored message,
    which redis-py parses and decodes one by one, joined in Python as before."""
    script = _registered.get(id(inbox))
    if script is None:
        script = _registered[id(inbox)] = inbox._client.register_script(
            _LOCK_AND_CLAIM_HISTORY_AS_LIST
        )
    found = script(
        keys=[keys.lock, keys.inbox, keys.processing, keys.messages, keys.conversation],
        args=[token, lock_ttl_ms, inbox._settings.session_expire_time],
    )
    if found is None:
        return None
    claimed, history, conversation_id = found
    return LockedClaim(_batch(claimed), history_json(history), conversation_id)
