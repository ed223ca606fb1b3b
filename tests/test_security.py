"""One test per security rule: credentials in, signatures out, no SSRF, admin surface,
privacy of logs. Real Redis, Flask's test client."""

from __future__ import annotations

import base64
import hmac
import json
import logging
import time
from hashlib import sha256

import pytest
import responses
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from common.callback_hosts import CallbackHostPolicy
from common.messages import CallbackPayload
from tests.factories import callback_payload
from webhook import create_app
from webhook.auth import meta_signature
from worker.callback import CallbackClient

GOOD = {"message_id": "wamid.S1", "from": "+59112345678", "text": "Hola"}
TOKEN = "s3cret-token"
APP_SECRET = "meta-app-secret"
ADMIN = "admin-token"


@pytest.fixture
def secured(make_settings, redis_client):
    settings = make_settings(webhook_token=TOKEN, whatsapp_app_secret=APP_SECRET, admin_token=ADMIN)
    return create_app(settings).test_client(), settings


def keys_under(redis_client, settings) -> list[str]:
    return list(redis_client.scan_iter(match=f"{settings.key_prefix}:*"))


# --- inbound credentials ---------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {TOKEN}"},
        {"Authorization": f"bearer {TOKEN}"},
        {"X-Webhook-Token": TOKEN},
    ],
)
def test_right_token_in_either_header_is_accepted(secured, headers):
    client, _ = secured
    assert client.post("/webhook", json=GOOD, headers=headers).status_code == 202


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"X-Webhook-Token": TOKEN[:-1]},
        {"X-Webhook-Token": TOKEN + "x"},
        {"X-Hub-Signature-256": "sha256=" + "0" * 64},
    ],
)
def test_missing_or_wrong_credentials_are_401_and_store_nothing(secured, redis_client, headers):
    client, settings = secured

    response = client.post("/webhook", json=GOOD, headers=headers)

    assert response.status_code == 401
    assert response.get_json() == {
        "error": "unauthorized",
        "message": "Missing or invalid credentials.",
    }
    assert keys_under(redis_client, settings) == []
    assert redis_client.llen(settings.task_queue) == 0


def test_meta_signature_of_the_raw_body_is_accepted(secured):
    client, _ = secured
    body = json.dumps(GOOD).encode()

    response = client.post(
        "/webhook",
        data=body,
        content_type="application/json",
        headers={"X-Hub-Signature-256": meta_signature(body, APP_SECRET)},
    )

    assert response.status_code == 202


def test_meta_signature_matches_an_independent_computation():
    body = b'{"object":"whatsapp_business_account"}'
    expected = "sha256=" + hmac.new(APP_SECRET.encode(), body, sha256).hexdigest()
    assert meta_signature(body, APP_SECRET) == expected


def test_tampered_body_fails_the_signature(secured, redis_client):
    client, settings = secured
    body = json.dumps(GOOD).encode()
    signature = meta_signature(body, APP_SECRET)
    tampered = body.replace(b"Hola", b"Hack")

    response = client.post(
        "/webhook",
        data=tampered,
        content_type="application/json",
        headers={"X-Hub-Signature-256": signature},
    )

    assert response.status_code == 401
    assert keys_under(redis_client, settings) == []


def test_signature_with_another_secret_fails(secured):
    client, _ = secured
    body = json.dumps(GOOD).encode()
    response = client.post(
        "/webhook",
        data=body,
        content_type="application/json",
        headers={"X-Hub-Signature-256": meta_signature(body, "other-secret")},
    )
    assert response.status_code == 401


def test_production_refuses_to_start_without_a_credential(make_settings):
    with pytest.raises(RuntimeError, match="WEBHOOK_TOKEN"):
        create_app(make_settings(environment="production"))


def test_development_without_credentials_warns_loudly(make_settings, caplog):
    with caplog.at_level(logging.WARNING, logger="webhook.auth"):
        create_app(make_settings())
    assert any(
        "SECURITY" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records
    )


# --- callback URL allow-list (SSRF) ------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata, link-local
        "http://[fe80::1]/x",  # IPv6 link-local
        "http://127.0.0.1:6379/",  # local Redis
        "http://localhost:8000/webhook",  # ourselves
        "http://10.0.0.5/internal",  # private
        "http://192.168.1.1/admin",  # private
        "http://[::1]/x",
        "https://n8n.example.com.evil.com/webhook",
        "https://n8n.example.com@evil.com/webhook",
        "http://n8n.example.com/webhook/reply",  # allowed host but wrong scheme
        "https://n8n.example.com:8443/webhook/reply",  # allowed host but other port
    ],
)
def test_callback_url_off_the_allow_list_is_422(make_settings, redis_client, url):
    settings = make_settings(n8n_callback_url="https://n8n.example.com/webhook/reply")
    client = create_app(settings).test_client()

    response = client.post("/webhook", json={**GOOD, "callback_url": url})

    assert response.status_code == 422
    assert response.get_json()["errors"][0]["field"] == "callback_url"
    assert keys_under(redis_client, settings) == []


def test_callback_url_on_the_default_allow_list_is_accepted(make_settings, redis_client):
    settings = make_settings(n8n_callback_url="https://n8n.example.com/webhook/reply")
    client = create_app(settings).test_client()

    response = client.post(
        "/webhook", json={**GOOD, "callback_url": "https://N8N.example.com/webhook/other"}
    )

    assert response.status_code == 202


def test_configured_allow_list_replaces_the_default(make_settings):
    policy = CallbackHostPolicy(
        make_settings(
            n8n_callback_url="https://n8n.example.com/webhook/reply",
            callback_allowed_hosts=["hooks.example.org", "http://10.1.2.3:5678"],
        )
    )

    assert policy.allows("https://hooks.example.org/a")
    assert policy.allows("http://hooks.example.org/a")
    assert policy.allows("http://10.1.2.3:5678/webhook/x")
    assert not policy.allows("https://10.1.2.3:5678/webhook/x")
    assert not policy.allows("http://10.1.2.3/webhook/x")
    assert not policy.allows("https://n8n.example.com/webhook/reply")
    assert not policy.allows("ftp://hooks.example.org/a")
    assert not policy.allows("not a url")


@responses.activate
def test_redirect_to_another_host_is_not_followed():
    responses.post(
        "https://n8n.example.com/reply",
        status=302,
        headers={"Location": "http://169.254.169.254/"},
    )
    responses.get("http://169.254.169.254/")
    client = CallbackClient(timeout=5)

    with pytest.raises(Exception, match="302"):
        client.post("https://n8n.example.com/reply", _payload(), "key-1")

    assert [c.request.url for c in responses.calls] == ["https://n8n.example.com/reply"]


# --- signed callbacks (Standard Webhooks) ------------------------------------------------

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def _payload() -> CallbackPayload:
    return callback_payload(
        to="+59112345678",
        session_id="+59112345678",
        reply="hola",
        in_reply_to=["m1"],
        conversation_id="c",
        latency_ms=1,
    )


@responses.activate
def test_callback_carries_a_verifiable_standard_webhooks_signature():
    responses.post("https://n8n.example.com/reply", status=200)
    CallbackClient(timeout=5, secret=SECRET).post("https://n8n.example.com/reply", _payload(), "k1")

    request = responses.calls[0].request
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert headers["webhook-id"] == "k1"
    verified = Webhook(SECRET).verify(request.body, headers)
    assert verified["reply"] == "hola"


@responses.activate
def test_tampered_or_replayed_callback_fails_verification():
    responses.post("https://n8n.example.com/reply", status=200)
    old = time.time() - 3600
    CallbackClient(timeout=5, secret=SECRET, clock=lambda: old).post(
        "https://n8n.example.com/reply", _payload(), "k1"
    )
    CallbackClient(timeout=5, secret=SECRET).post("https://n8n.example.com/reply", _payload(), "k2")
    replayed, fresh = (c.request for c in responses.calls)
    fresh_headers = {k.lower(): v for k, v in fresh.headers.items()}

    with pytest.raises(WebhookVerificationError):  # an hour old: outside the tolerance
        Webhook(SECRET).verify(replayed.body, {k.lower(): v for k, v in replayed.headers.items()})
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(fresh.body.replace(b"hola", b"hack"), fresh_headers)
    with pytest.raises(WebhookVerificationError):
        other = "whsec_" + base64.b64encode(b"x" * 32).decode()
        Webhook(other).verify(fresh.body, fresh_headers)


# --- abuse limits --------------------------------------------------------------------------


def test_rate_limit_edge_exactly_at_the_limit(make_settings, redis_client):
    client = create_app(make_settings(rate_limit_per_minute=5)).test_client()
    statuses = [
        client.post("/webhook", json={**GOOD, "message_id": f"r{n}"}).status_code for n in range(6)
    ]
    assert statuses == [202] * 5 + [429]


def test_body_just_under_and_over_the_limit(make_settings, redis_client):
    client = create_app(make_settings(max_body_bytes=300)).test_client()

    def body_of(size: int) -> bytes:
        base = json.dumps({**GOOD, "metadata": {"pad": ""}})
        return json.dumps({**GOOD, "metadata": {"pad": "x" * (size - len(base))}}).encode()

    assert (
        client.post("/webhook", data=body_of(300), content_type="application/json").status_code
        == 202
    )
    assert (
        client.post("/webhook", data=body_of(301), content_type="application/json").status_code
        == 413
    )


# --- admin surface -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/chat/history/+59112345678"), ("DELETE", "/chat/history/+59112345678")],
)
def test_admin_endpoints_need_the_admin_token(secured, method, path):
    client, _ = secured
    assert client.open(path, method=method).status_code == 401
    assert client.open(path, method=method, headers={"X-Webhook-Token": TOKEN}).status_code == 401
    authorized = client.open(path, method=method, headers={"X-Admin-Token": ADMIN})
    assert authorized.status_code == 404  # allowed in; no such conversation
    bearer = client.open(path, method=method, headers={"Authorization": f"Bearer {ADMIN}"})
    assert bearer.status_code == 404


def test_admin_endpoints_are_closed_in_production_without_admin_token(make_settings):
    client = create_app(make_settings(environment="production", webhook_token=TOKEN)).test_client()
    assert client.get("/chat/history/+591").status_code == 401


def test_debug_endpoints_exist_only_in_development(make_settings, redis_client):
    dev = create_app(make_settings(admin_token=ADMIN)).test_client()
    prod = create_app(
        make_settings(environment="production", webhook_token=TOKEN, admin_token=ADMIN)
    ).test_client()
    auth = {"X-Admin-Token": ADMIN}

    assert dev.get("/redis/test", headers=auth).get_json()["status"] == "ok"
    assert dev.get("/redis/stats", headers=auth).status_code == 200
    assert dev.get("/redis/stats").status_code == 401
    for path, method in (
        ("/redis/test", "GET"),
        ("/redis/stats", "GET"),
        ("/redis/clear", "DELETE"),
    ):
        assert prod.open(path, method=method, headers=auth).status_code == 404


def test_debug_clear_deletes_only_this_prefix(make_settings, redis_client):
    settings = make_settings(admin_token=ADMIN)
    client = create_app(settings).test_client()
    client.post("/webhook", json=GOOD)
    redis_client.set("someone-else:key", "keep", ex=60)

    response = client.delete("/redis/clear", headers={"X-Admin-Token": ADMIN})

    assert response.get_json()["deleted"] >= 2
    assert keys_under(redis_client, settings) == []
    assert redis_client.get("someone-else:key") == "keep"
    redis_client.delete("someone-else:key")


# --- privacy ---------------------------------------------------------------------------------


def test_logs_carry_no_raw_phone_number_or_text(make_settings, redis_client, caplog):
    client = create_app(make_settings()).test_client()
    with caplog.at_level(logging.INFO):
        client.post("/webhook", json={**GOOD, "text": "mi clave es 1234"})
        client.post("/webhook", json={**GOOD, "text": "mi clave es 1234"})  # duplicate
        client.get("/chat/history/+59112345678")
        client.delete("/chat/history/+59112345678")

    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "+591****5678" in text
    assert "+59112345678" not in text
    assert "mi clave" not in text


def test_production_logs_are_one_json_object_per_line(make_settings, redis_client, caplog):
    import logging as stdlib_logging

    from common.logging_setup import configure_logging

    settings = make_settings(environment="production", webhook_token=TOKEN)
    try:
        client = create_app(settings).test_client()
        (handler,) = [
            h for h in stdlib_logging.getLogger().handlers if getattr(h, "_whatsapp_reply", False)
        ]
        with caplog.at_level(stdlib_logging.INFO):
            client.post("/webhook", json=GOOD, headers={"X-Webhook-Token": TOKEN})
        lines = [handler.format(record) for record in caplog.records]
    finally:
        configure_logging("INFO", "text")  # leave the root logger as other tests expect

    entries = [json.loads(line) for line in lines]
    # One line per request: the access line carries what was queued.
    assert any(
        e["event"].startswith("POST /webhook 202 ") and "queued message_id=wamid.S1" in e["event"]
        for e in entries
    )
    assert all({"time", "level", "logger", "event", "pid"} <= set(e) for e in entries)
    assert all("\n" not in line for line in lines)
    assert "+59112345678" not in "\n".join(lines)
