"""Operator commands beside dead letters: `check`, `send` and `history`.

`check` is what the seeds' test-redis script did, for this product: it reads the
settings, pings Redis, connects to the broker and (unless told not to) loads the model
and generates one reply, printing one line per step. Every step runs even after one
failed (so one run shows every problem; only unreadable settings stop it at once), and
the exit status is 1 if any step failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

import requests

from common.conversation_store import ConversationStore
from common.keys import session_keys
from common.queue import make_celery
from common.redis_client import connect
from common.settings import Settings, get_settings


def _step(name: str, ok: bool, detail: str) -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    return ok


def check(args: argparse.Namespace) -> int:
    try:
        settings = get_settings()
    except Exception as exc:  # a settings error is the answer here, not a crash
        _step("settings", False, str(exc))
        return 1
    _step(
        "settings",
        True,
        f"environment={settings.environment} model={settings.model_name} "
        f"prefix={settings.key_prefix} queue={settings.task_queue}",
    )
    steps = [_check_redis(settings), _check_broker(settings)]
    if not args.no_model:
        steps.append(_check_model(settings))
    return 0 if all(steps) else 1


def _check_redis(settings: Settings) -> bool:
    try:
        client = connect(settings)
        started = time.perf_counter()
        client.ping()
        version = client.info("server").get("redis_version")
    except Exception as exc:
        return _step("redis", False, f"{settings.redis_url}: {exc}")
    elapsed = (time.perf_counter() - started) * 1000
    return _step("redis", True, f"version {version}, ping {elapsed:.1f} ms")


def _check_broker(settings: Settings) -> bool:
    app = make_celery(settings, main="check")
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=settings.redis_socket_timeout)
            depth = connection.default_channel.client.llen(settings.task_queue)
    except Exception as exc:
        return _step("broker", False, str(exc))
    return _step("broker", True, f"queue {settings.task_queue!r} holds {depth} task(s)")


def _check_model(settings: Settings) -> bool:
    try:
        from worker.context import Turn
        from worker.model import ChatModel

        started = time.perf_counter()
        model = ChatModel.load(settings)
        loaded = time.perf_counter() - started
        reply = model.reply([Turn("user", "Hello!")])
    except Exception as exc:
        return _step("model", False, f"{settings.model_name}: {exc}")
    return _step(
        "model",
        True,
        f"{settings.model_name} on {model.device}, loaded in {loaded:.1f}s, "
        f"context {model.max_context_tokens} tokens, test reply {reply.new_tokens} tokens",
    )


def send(args: argparse.Namespace) -> int:
    """Post a message to the webhook and wait for its reply to appear in the history."""
    settings = get_settings()
    message_id = f"cli-{uuid.uuid4().hex[:12]}"
    body = {"message_id": message_id, "from": args.sender, "text": args.text}
    headers = {}
    if settings.webhook_token is not None:
        headers["X-Webhook-Token"] = settings.webhook_token.get_secret_value()
    try:
        response = requests.post(args.url, json=body, headers=headers, timeout=10)
    except requests.RequestException as exc:
        print(f"webhook unreachable at {args.url}: {exc}", file=sys.stderr)
        return 1
    print(f"webhook answered {response.status_code}: {response.text.strip()}")
    if response.status_code != 202:
        return 1
    store = ConversationStore(connect(settings), settings)
    keys = session_keys(settings.key_prefix, args.sender)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        for stored in store.turns(keys):
            if message_id in stored.metadata.get("in_reply_to", []):
                print(f"reply: {stored.content}")
                return 0
        time.sleep(0.2)
    print(f"no reply within {args.timeout}s (is a worker running?)", file=sys.stderr)
    return 1


def history(args: argparse.Namespace) -> int:
    settings = get_settings()
    store = ConversationStore(connect(settings), settings)
    conversation = store.history(session_keys(settings.key_prefix, args.session_id))
    if conversation is None:
        print("no conversation for this session", file=sys.stderr)
        return 1
    print(json.dumps(conversation.model_dump(), ensure_ascii=False, indent=2))
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    checking = commands.add_parser("check", help="settings, Redis, broker and model dry run")
    checking.add_argument("--no-model", action="store_true", help="skip loading the model")
    checking.set_defaults(run=check)

    sending = commands.add_parser("send", help="post a test message and wait for the reply")
    sending.add_argument("text")
    sending.add_argument("--from", dest="sender", default="+10000000000")
    sending.add_argument("--url", default="http://127.0.0.1:8000/webhook")
    sending.add_argument("--timeout", type=float, default=120)
    sending.set_defaults(run=send)

    showing = commands.add_parser("history", help="print one conversation as JSON")
    showing.add_argument("session_id")
    showing.set_defaults(run=history)
