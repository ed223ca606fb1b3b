"""The webhook against a real Redis: what is accepted, what is refused, and that a
refusal stores and enqueues nothing."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient

from common.keys import session_keys
from common.queue import REPLY_TASK
from common.settings import Settings
from tests.redis_server import free_port, private_redis

ROOT = Path(__file__).resolve().parent.parent

GOOD = {
    "message_id": "wamid.HBgL001",
    "from": "+59112345678",
    "text": "Hola",
    "name": "Ana",
    "metadata": {"phone_number_id": "1098"},
}


def post(client: FlaskClient, body: object, **kwargs):
    return client.post("/webhook", json=body, **kwargs)


def queued_tasks(redis_client: redis.Redis, settings: Settings) -> list[dict]:
    """The Celery messages waiting on this test's broker queue."""
    return [json.loads(raw) for raw in redis_client.lrange(settings.task_queue, 0, -1)]


def stored_keys(redis_client: redis.Redis, settings: Settings) -> list[str]:
    return list(redis_client.scan_iter(match=f"{settings.key_prefix}:*"))


def test_accepts_a_message_stores_it_and_enqueues_one_task(client, redis_client, settings):
    response = post(client, GOOD)

    assert response.status_code == 202
    assert response.get_json() == {
        "status": "queued",
        "message_id": "wamid.HBgL001",
        "session_id": "+59112345678",
        "pending": 1,
    }
    inbox = redis_client.lrange(session_keys(settings.key_prefix, "+59112345678").inbox, 0, -1)
    assert len(inbox) == 1
    pending = json.loads(inbox[0])
    assert pending["text"] == "Hola"
    assert pending["metadata"] == {"phone_number_id": "1098"}
    tasks = queued_tasks(redis_client, settings)
    assert len(tasks) == 1
    assert tasks[0]["headers"]["task"] == REPLY_TASK
    args, kwargs, _ = json.loads(base64.b64decode(tasks[0]["body"]))
    assert (args, kwargs) == (["+59112345678"], {})


def test_session_id_overrides_sender_as_conversation_key(client, redis_client, settings):
    response = post(client, {**GOOD, "session_id": "shop-42"})

    assert response.status_code == 202
    assert response.get_json()["session_id"] == "shop-42"
    assert redis_client.llen(session_keys(settings.key_prefix, "shop-42").inbox) == 1


def test_repeated_message_id_is_a_duplicate_and_enqueues_nothing(client, redis_client, settings):
    assert post(client, GOOD).status_code == 202
    again = post(client, {**GOOD, "text": "changed text"})

    assert again.status_code == 200
    assert again.get_json()["status"] == "duplicate"
    assert len(queued_tasks(redis_client, settings)) == 1
    inbox = session_keys(settings.key_prefix, GOOD["from"]).inbox
    assert redis_client.llen(inbox) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({k: v for k, v in GOOD.items() if k != "message_id"}, "message_id"),
        ({k: v for k, v in GOOD.items() if k != "from"}, "from"),
        ({k: v for k, v in GOOD.items() if k != "text"}, "text"),
        ({**GOOD, "text": ""}, "text"),
        ({**GOOD, "text": "   \n "}, "text"),
        ({**GOOD, "text": 5}, "text"),
        ({**GOOD, "message_id": ""}, "message_id"),
        ({**GOOD, "message_id": 123}, "message_id"),
        ({**GOOD, "from": "+591 123"}, "from"),
        ({**GOOD, "session_id": "a{b}"}, "session_id"),
        ({**GOOD, "timestamp": "yesterday"}, "timestamp"),
        ({**GOOD, "timestamp": -1}, "timestamp"),
        ({**GOOD, "callback_url": "not a url"}, "callback_url"),
        ({**GOOD, "callback_url": "ftp://example.com/x"}, "callback_url"),
        ({**GOOD, "metadata": ["a"]}, "metadata"),
        ({**GOOD, "name": "x" * 257}, "name"),
    ],
)
def test_invalid_field_is_422_naming_it_and_changes_nothing(
    client, redis_client, settings, body, field
):
    response = post(client, body)

    assert response.status_code == 422
    payload = response.get_json()
    assert payload["error"] == "invalid_payload"
    assert field in [error["field"] for error in payload["errors"]]
    assert payload["message"].startswith(field)
    assert stored_keys(redis_client, settings) == []
    assert queued_tasks(redis_client, settings) == []


def test_text_over_the_configured_limit_is_422(make_settings, redis_client):
    from webhook import create_app

    client = create_app(make_settings(max_text_length=10)).test_client()

    response = post(client, {**GOOD, "text": "x" * 11})

    assert response.status_code == 422
    assert "10 characters" in response.get_json()["message"]
    assert post(client, {**GOOD, "text": "x" * 10}).status_code == 202


@pytest.mark.parametrize(
    ("data", "content_type", "status", "error"),
    [
        ("{not json", "application/json", 400, "invalid_json"),
        ("", "application/json", 400, "invalid_json"),
        ('["a", "list"]', "application/json", 422, "invalid_payload"),
        ('"text"', "application/json", 422, "invalid_payload"),
        (
            "message_id=1&text=hi",
            "application/x-www-form-urlencoded",
            415,
            "unsupported_media_type",
        ),
        ("hola", "text/plain", 415, "unsupported_media_type"),
    ],
)
def test_malformed_bodies_are_4xx_json(
    client, redis_client, settings, data, content_type, status, error
):
    response = client.post("/webhook", data=data, content_type=content_type)

    assert response.status_code == status
    assert response.is_json
    assert response.get_json()["error"] == error
    assert stored_keys(redis_client, settings) == []


def post_chunked(client: FlaskClient, body: object):
    """POST as gunicorn hands over a chunked body: no Content-Length, input terminated."""
    return client.post(
        "/webhook",
        input_stream=io.BytesIO(json.dumps(body).encode()),
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )


# Without a length to check, Werkzeug cut a chunked body at the limit: "not valid JSON".
@pytest.mark.parametrize("send", [post, post_chunked], ids=["sized", "chunked"])
def test_oversized_body_is_413(make_settings, redis_client, send):
    from webhook import create_app

    settings = make_settings(max_body_bytes=512)
    client = create_app(settings).test_client()

    response = send(client, {**GOOD, "metadata": {"blob": "x" * 600}})

    assert response.status_code == 413
    assert response.get_json()["error"] == "request_entity_too_large"
    assert stored_keys(redis_client, settings) == []
    assert send(client, GOOD).status_code == 202


def post_raw(client: FlaskClient, text: str):
    """POST a JSON text as is: `json.dumps` escapes a lone surrogate as `\\ud800`."""
    return client.post("/webhook", data=text, content_type="application/json")


def nested_metadata(depth: int) -> dict:
    """A metadata object `depth` levels deep (the object itself is level 1)."""
    value: object = "leaf"
    for _ in range(depth - 1):
        value = [value]
    return {"x": value}


def assert_refused(response, redis_client, settings, status: int, error: str) -> dict:
    assert response.status_code == status
    payload = response.get_json()
    assert payload["error"] == error
    assert stored_keys(redis_client, settings) == []
    assert queued_tasks(redis_client, settings) == []
    return payload


@pytest.mark.parametrize("kind", ["[", '{"a":'])
def test_json_nested_past_the_parser_limit_is_400(make_settings, redis_client, kind):
    from webhook import create_app

    settings = make_settings(max_body_bytes=1_000_000)  # reach the parser, not the 413
    client = create_app(settings).test_client()
    closing = "]" if kind == "[" else "}"
    depth = 50_000

    response = post_raw(client, kind * depth + "1" + closing * depth)

    payload = assert_refused(response, redis_client, settings, 400, "invalid_json")
    assert payload["message"] == "The JSON body is nested too deeply."


def test_metadata_at_the_depth_limit_is_accepted(client, redis_client, settings):
    from common.messages import METADATA_MAX_DEPTH

    response = post(client, {**GOOD, "metadata": nested_metadata(METADATA_MAX_DEPTH)})

    assert response.status_code == 202
    inbox = session_keys(settings.key_prefix, GOOD["from"]).inbox
    assert json.loads(redis_client.lindex(inbox, 0))["metadata"] == nested_metadata(
        METADATA_MAX_DEPTH
    )


@pytest.mark.parametrize("depth", [33, 300, 900])
def test_metadata_nested_too_deep_is_422(client, redis_client, settings, depth):
    response = post_raw(client, json.dumps({**GOOD, "metadata": nested_metadata(depth)}))

    payload = assert_refused(response, redis_client, settings, 422, "invalid_payload")
    assert payload["message"] == "metadata: is nested deeper than 32 levels"
    assert [e["field"] for e in payload["errors"]] == ["metadata"]


def test_metadata_over_the_size_limit_is_422(make_settings, redis_client):
    from common.messages import METADATA_MAX_BYTES
    from webhook import create_app

    settings = make_settings(max_body_bytes=10 * METADATA_MAX_BYTES)
    client = create_app(settings).test_client()

    response = post(client, {**GOOD, "metadata": {"blob": "x" * METADATA_MAX_BYTES}})

    payload = assert_refused(response, redis_client, settings, 422, "invalid_payload")
    assert payload["message"] == f"metadata: is larger than {METADATA_MAX_BYTES} bytes as JSON"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"text": "hola \ud800"}, "text"),
        ({"name": "\udfffAna"}, "name"),
        ({"from": "+591\ud800"}, "from"),
        ({"session_id": "s-\ud800"}, "session_id"),
        ({"message_id": "wamid.\udbff"}, "message_id"),
        ({"metadata": {"phone_number_id": "\ud800"}}, "metadata"),
        ({"metadata": {"\ud800": 1}}, "metadata"),
        ({"metadata": {"a": [{"b": ["x\udc00"]}]}}, "metadata"),
    ],
)
def test_lone_surrogate_in_a_stored_string_is_422(client, redis_client, settings, change, field):
    response = post_raw(client, json.dumps({**GOOD, **change}))

    payload = assert_refused(response, redis_client, settings, 422, "invalid_payload")
    assert [e["field"] for e in payload["errors"]] == [field]
    assert payload["message"] == (
        f"{field}: is not valid Unicode text (it contains a lone surrogate)"
    )


def test_missing_callback_url_without_default_is_422(make_settings, redis_client):
    from webhook import create_app

    settings = make_settings(n8n_callback_url=None, callback_allowed_hosts=["n8n.example.com"])
    client = create_app(settings).test_client()

    refused = post(client, GOOD)
    accepted = post(client, {**GOOD, "callback_url": "https://n8n.example.com/webhook/reply"})

    assert refused.status_code == 422
    assert refused.get_json()["errors"][0]["field"] == "callback_url"
    assert accepted.status_code == 202


def test_rate_limit_answers_429_with_retry_after_and_stores_nothing(make_settings, redis_client):
    from webhook import create_app

    settings = make_settings(rate_limit_per_minute=3)
    client = create_app(settings).test_client()
    for n in range(3):
        assert post(client, {**GOOD, "message_id": f"m{n}"}).status_code == 202

    limited = post(client, {**GOOD, "message_id": "m3"})

    assert limited.status_code == 429
    assert limited.get_json()["error"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert redis_client.llen(session_keys(settings.key_prefix, GOOD["from"]).inbox) == 3
    # the refused id was not marked as seen: it is accepted once the window allows
    assert not redis_client.exists(session_keys(settings.key_prefix, GOOD["from"]).seen("m3"))
    assert len(queued_tasks(redis_client, settings)) == 3


def test_full_inbox_answers_429(make_settings, redis_client):
    from webhook import create_app

    settings = make_settings(max_pending_per_session=2, rate_limit_per_minute=0)
    client = create_app(settings).test_client()
    for n in range(2):
        assert post(client, {**GOOD, "message_id": f"m{n}"}).status_code == 202

    full = post(client, {**GOOD, "message_id": "m2"})

    assert full.status_code == 429
    assert full.get_json()["error"] == "inbox_full"
    assert "Retry-After" in full.headers


def test_redis_unreachable_is_503_with_retry_after(make_settings):
    from webhook import create_app

    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = create_app(make_settings(redis_url=dead, redis_socket_timeout=0.2)).test_client()

    for response in (post(client, GOOD), client.get("/ready"), client.get("/chat/history/x")):
        assert response.status_code == 503
        assert response.is_json
        assert int(response.headers["Retry-After"]) > 0
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    "refusing",
    [
        # A replica whose master is gone: what a client sees during a failover.
        lambda r: r.execute_command("REPLICAOF", "127.0.0.1", str(free_port())),
        # maxmemory reached with the default noeviction policy.
        lambda r: r.config_set("maxmemory", "1"),
        # Writes need a replica that is not there (a plain ResponseError in redis-py).
        lambda r: r.config_set("min-replicas-to-write", "1"),
        # A replica cut off from its master that will not serve stale data.
        lambda r: (
            r.config_set("replica-serve-stale-data", "no"),
            r.execute_command("REPLICAOF", "127.0.0.1", str(free_port())),
        ),
    ],
    ids=["read-only replica", "out of memory", "no replicas", "master down"],
)
def test_a_redis_that_refuses_writes_is_503_and_not_ready(make_settings, refusing):
    from webhook import create_app

    with private_redis() as url:
        client = create_app(make_settings(redis_url=url, broker_url=url)).test_client()
        assert client.get("/ready").status_code == 200
        refusing(redis.Redis.from_url(url))

        for response in (post(client, GOOD), client.get("/ready")):
            assert response.status_code == 503, response.get_data(as_text=True)
            assert response.get_json()["error"] == "unavailable"
            assert int(response.headers["Retry-After"]) > 0
        with contextlib.suppress(redis.exceptions.MasterDownError):  # it serves no reads
            assert redis.Redis.from_url(url).dbsize() <= 1  # at most the readiness probe


def test_any_other_redis_error_is_a_500_of_ours(client, monkeypatch):
    # A script or command Redis rejects as wrong is a bug here, not an outage to wait out.
    from common.inbox import Inbox

    def wrong(*args, **kwargs):
        raise redis.ResponseError("ERR user_script:1: Script attempted to access a global")

    monkeypatch.setattr(Inbox, "accept", wrong)

    response = post(client, GOOD)

    assert response.status_code == 500
    assert response.get_json()["error"] == "internal_error"
    assert "Retry-After" not in response.headers


def test_health_and_ready(client):
    assert client.get("/health").get_json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.get_json()["redis"] == "ok"
    assert ready.get_json()["workers_seen"] == 0


def test_ready_reports_a_worker_heartbeat(client, redis_client, settings):
    from common.keys import worker_heartbeat

    redis_client.set(worker_heartbeat(settings.key_prefix, "celery@box"), "{}", ex=30)

    body = client.get("/ready").get_json()

    assert body["workers"] == ["celery@box"]


def test_unknown_route_and_method_are_json(client):
    missing = client.get("/nope")
    wrong_method = client.put("/webhook")

    assert missing.status_code == 404 and missing.get_json()["error"] == "not_found"
    assert wrong_method.status_code == 405 and wrong_method.is_json
    assert "POST" in wrong_method.headers["Allow"]  # HTTP requires it on a 405


def test_history_missing_and_bad_session(client):
    assert client.get("/chat/history/+591000").status_code == 404
    assert client.get("/chat/history/a%20b").status_code == 400
    assert client.delete("/chat/history/+591000").status_code == 404


@pytest.mark.parametrize("separator", ["\x1c", "\x1d", "\x1e", "\x1f"])
def test_a_session_id_the_history_would_refuse_is_refused_at_the_webhook(
    client, redis_client, settings, separator
):
    # Python's regex counts U+001C-U+001F as whitespace, pydantic's did not: such a
    # conversation was stored, then could be neither read nor erased.
    session = f"a{separator}b"

    response = post(client, {**GOOD, "session_id": session})

    assert response.status_code == 422
    assert response.get_json()["errors"][0]["field"] == "session_id"
    assert client.get(f"/chat/history/a%{ord(separator):02X}b").status_code == 400
    assert stored_keys(redis_client, settings) == []


def test_a_simple_form_body_with_messaging_product_is_not_dropped(client, redis_client):
    # Read as a WhatsApp `value` item it had no messages: "ignored", and nothing stored.
    response = post(client, {**GOOD, "messaging_product": "whatsapp"})

    assert response.status_code == 202, response.get_json()
    assert response.get_json()["status"] == "queued"


def test_a_boolean_timestamp_is_refused(client, redis_client, settings):
    response = post(client, {**GOOD, "timestamp": True})

    assert response.status_code == 422
    assert response.get_json()["errors"][0]["field"] == "timestamp"
    assert stored_keys(redis_client, settings) == []


def test_webhook_never_imports_torch_or_transformers():
    code = (
        "import sys\n"
        "from webhook import create_app\n"
        "create_app()\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('clean')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"


def test_with_a_separate_broker_the_task_is_published_there(settings, redis_client):
    from webhook import create_app

    broker_url = settings.redis_url.rsplit("/", 1)[0] + "/13"
    separate = settings.model_copy(update={"broker_url": broker_url})
    broker = redis.Redis.from_url(broker_url, decode_responses=True)
    try:
        response = post(create_app(separate).test_client(), GOOD)

        assert response.status_code == 202
        assert queued_tasks(redis_client, settings) == []  # not in the conversations' Redis
        [task] = [json.loads(raw) for raw in broker.lrange(settings.task_queue, 0, -1)]
        assert task["headers"]["task"] == "worker.reply_to_session"
    finally:
        broker.delete(settings.task_queue)
        broker.close()


def test_unreachable_separate_broker_is_503_and_the_message_is_not_kept(settings, redis_client):
    from webhook import create_app

    dead = settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{free_port()}/0", "redis_socket_timeout": 0.2}
    )
    client = create_app(dead).test_client()

    response = post(client, GOOD)

    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) > 0
    # Withdrawn, so a retry is not "duplicate"; only the rate counter stays, given back.
    keys = session_keys(settings.key_prefix, GOOD["from"])
    assert stored_keys(redis_client, settings) == [keys.rate]
    assert redis_client.get(keys.rate) == "0"


@pytest.mark.parametrize("separate_broker", [False, True])
def test_no_task_is_sent_while_a_worker_holds_the_session(
    settings, redis_client, separate_broker, caplog
):
    from webhook import create_app

    broker_url = settings.redis_url.rsplit("/", 1)[0] + "/13"
    used = settings.model_copy(update={"broker_url": broker_url}) if separate_broker else settings
    broker = redis.Redis.from_url(used.effective_broker_url, decode_responses=True)
    lock = session_keys(settings.key_prefix, GOOD["from"]).lock
    redis_client.set(lock, "holder-token", px=30_000)
    try:
        response = post(create_app(used).test_client(), GOOD)

        assert response.status_code == 202
        assert response.get_json()["pending"] == 1
        assert broker.llen(settings.task_queue) == 0  # the holder answers it
        [line] = [r.getMessage() for r in caplog.records if r.name == "webhook.access"]
        assert line.endswith("task=none (a worker holds the session)")
    finally:
        broker.delete(settings.task_queue)
        broker.close()
