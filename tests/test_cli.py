"""`python -m worker dead-letters …` against a real Redis and a local n8n stand-in."""

from __future__ import annotations

import json
import time

import pytest

from common.messages import OutboxEntry
from common.settings import get_settings
from tests.factories import callback_payload, outbox_entry
from tests.processes import callback_receiver
from worker.cli import main
from worker.outbox import DeadLetters


@pytest.fixture
def dead_letters(settings, redis_client, monkeypatch) -> DeadLetters:
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    monkeypatch.setenv("KEY_PREFIX", settings.key_prefix)
    get_settings.cache_clear()
    return DeadLetters(redis_client, settings.key_prefix)


def dead_letter(key: str, url: str, failed_at: float) -> OutboxEntry:
    return outbox_entry(
        key,
        callback_payload(reply=f"reply {key}", in_reply_to=[f"m-{key}"]),
        url=url,
        created_at=failed_at - 60,
        next_attempt_at=failed_at,
        attempts=4,
        last_error="callback answered 500",
        failed_at=failed_at,
    )


def test_list_prints_one_json_line_per_dead_letter_oldest_first(dead_letters, capsys):
    dead_letters.add(dead_letter("k2", "http://127.0.0.1:9/x", time.time()))
    dead_letters.add(dead_letter("k1", "http://127.0.0.1:9/x", time.time() - 100))

    assert main(["dead-letters", "list"]) == 0

    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["idempotency_key"] for r in rows] == ["k1", "k2"]
    assert rows[0]["attempts"] == 4
    assert rows[0]["in_reply_to"] == ["m-k1"]
    assert "payload" not in rows[0]


def test_replay_delivers_with_the_same_key_and_removes_it(dead_letters):
    with callback_receiver() as receiver:
        dead_letters.add(dead_letter("k1", receiver.url, time.time()))

        assert main(["dead-letters", "replay", "--all"]) == 0

        (callback,) = receiver.received
    assert callback.headers["Idempotency-Key"] == "k1"
    assert callback.body["reply"] == "reply k1"
    assert dead_letters.all() == []


def test_replay_that_fails_again_keeps_it_with_the_new_error(dead_letters):
    with callback_receiver() as receiver:
        receiver.status_for = lambda n: 502
        dead_letters.add(dead_letter("k1", receiver.url, time.time()))

        assert main(["dead-letters", "replay", "k1"]) == 1

    (kept,) = dead_letters.all()
    assert kept.attempts == 5
    assert kept.last_error == "callback answered 502"


def test_replay_of_an_unknown_key_fails(dead_letters):
    assert main(["dead-letters", "replay", "nope"]) == 1


def test_purge_by_key_and_all(dead_letters):
    for key in ("k1", "k2", "k3"):
        dead_letters.add(dead_letter(key, "http://127.0.0.1:9/x", time.time()))

    assert main(["dead-letters", "purge", "k2"]) == 0
    assert sorted(e.idempotency_key for e in dead_letters.all()) == ["k1", "k3"]
    assert main(["dead-letters", "purge", "--all"]) == 0
    assert dead_letters.all() == []


@pytest.fixture
def cli_env(settings, redis_client, monkeypatch):
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    monkeypatch.setenv("KEY_PREFIX", settings.key_prefix)
    monkeypatch.setenv("TASK_QUEUE", settings.task_queue)
    get_settings.cache_clear()
    return settings


def test_check_without_model_passes_against_real_redis(cli_env, capsys):
    assert main(["check", "--no-model"]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["ok   settings", "ok   redis", "ok   broker"]


def test_check_loads_the_model_and_generates(cli_env, monkeypatch, tiny_model_dir, capsys):
    monkeypatch.setenv("MODEL_NAME", str(tiny_model_dir))
    monkeypatch.setenv("MAX_NEW_TOKENS", "4")
    get_settings.cache_clear()

    assert main(["check"]) == 0

    model_line = capsys.readouterr().out.splitlines()[-1]
    assert model_line.startswith("ok   model:")
    assert "context 256 tokens" in model_line


def test_check_fails_when_redis_is_unreachable(monkeypatch, capsys):
    from tests.redis_server import free_port

    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("REDIS_SOCKET_TIMEOUT", "0.3")
    get_settings.cache_clear()

    assert main(["check", "--no-model"]) == 1

    out = capsys.readouterr().out
    assert "FAIL redis" in out
    assert "FAIL broker" in out


def test_history_prints_the_conversation(cli_env, redis_client, capsys):
    from common.conversation_store import ConversationStore
    from common.inbox import Inbox
    from common.keys import session_keys
    from common.messages import PendingMessage, StoredMessage

    keys = session_keys(cli_env.key_prefix, "+59170000001")
    inbox, store = Inbox(redis_client, cli_env), ConversationStore(redis_client, cli_env)
    inbox.accept(
        keys,
        PendingMessage(
            message_id="m1", session_id="+59170000001", sender="+59170000001", text="hola"
        ),
    )
    batch = inbox.claim(keys)
    store.commit(
        keys,
        batch,
        conversation_id="conv_x",
        user_id="+59170000001",
        messages=[StoredMessage(message_id="m1", role="user", content="hola", timestamp="t")],
        metadata={},
        now="2026-01-01T00:00:00+00:00",
        outbox=None,
    )

    assert main(["history", "+59170000001"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["conversation_id"] == "conv_x"
    assert shown["messages"][0]["content"] == "hola"
    assert main(["history", "+59170000999"]) == 1
