"""WhatsApp payload forms as Meta documents them, the subscription handshake, and the
conversation commands, through the real webhook and a real Redis."""

from __future__ import annotations

import copy
import json

import pytest

from common.keys import session_keys
from common.messages import PendingMessage
from common.settings import Settings
from webhook import create_app

PHONE_NUMBER_ID = "106540352242922"
USER = "16315551234"


def notification(*messages: dict, statuses: list | None = None, contacts: list | None = None):
    """The envelope of Meta's "Webhooks payload examples" for WhatsApp."""
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
    }
    if messages:
        value["contacts"] = contacts or [{"profile": {"name": "Kerry Fisher"}, "wa_id": USER}]
        value["messages"] = list(messages)
    if statuses is not None:
        value["statuses"] = statuses
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"value": value, "field": "messages"}]}],
    }


def text_message(mid: str, body: str, sender: str = USER) -> dict:
    return {
        "from": sender,
        "id": mid,
        "timestamp": "1603059201",
        "text": {"body": body},
        "type": "text",
    }


IMAGE = {
    "from": USER,
    "id": "wamid.IMG",
    "timestamp": "1603059201",
    "type": "image",
    "image": {"caption": "look", "mime_type": "image/jpeg", "sha256": "abc", "id": "1234"},
}
BUTTON_REPLY = {
    "context": {"from": "15550783881", "id": "wamid.CTX"},
    "from": USER,
    "id": "wamid.BTN",
    "timestamp": "1603059201",
    "type": "interactive",
    "interactive": {
        "type": "button_reply",
        "button_reply": {"id": "unique-button-identifier-here", "title": "Yes, book it"},
    },
}
LIST_REPLY = {
    "from": USER,
    "id": "wamid.LST",
    "timestamp": "1603059201",
    "type": "interactive",
    "interactive": {
        "type": "list_reply",
        "list_reply": {"id": "row-1", "title": "Tomorrow 10:00", "description": "Cardiology"},
    },
}
REACTION = {
    "from": USER,
    "id": "wamid.RCT",
    "timestamp": "1603059201",
    "type": "reaction",
    "reaction": {"message_id": "wamid.ORIG", "emoji": "\U0001f600"},
}
STATUS = {
    "id": "wamid.OUT",
    "status": "delivered",
    "timestamp": "1603086313",
    "recipient_id": USER,
    "conversation": {"id": "CONVERSATION_ID", "origin": {"type": "service"}},
    "pricing": {"billable": True, "pricing_model": "CBP", "category": "service"},
}


@pytest.fixture
def app_client(make_settings, redis_client):
    settings = make_settings(rate_limit_per_minute=0, whatsapp_verify_token="verify-me")
    return create_app(settings).test_client(), settings


def inbox(redis_client, settings, session: str = USER) -> list[PendingMessage]:
    raw = redis_client.lrange(session_keys(settings.key_prefix, session).inbox, 0, -1)
    return [PendingMessage.model_validate_json(item) for item in raw]


def test_text_notification_is_queued_with_name_and_phone_number_id(app_client, redis_client):
    client, settings = app_client

    response = client.post("/webhook", json=notification(text_message("wamid.T1", "Hola")))

    assert response.status_code == 200
    assert response.get_json() == {
        "status": "queued",
        "queued": ["wamid.T1"],
        "duplicates": [],
        "statuses": 0,
        "skipped": 0,
    }
    (pending,) = inbox(redis_client, settings)
    assert (pending.text, pending.name, pending.kind) == ("Hola", "Kerry Fisher", "text")
    assert pending.timestamp == 1603059201
    assert pending.metadata["phone_number_id"] == PHONE_NUMBER_ID
    assert redis_client.llen(settings.task_queue) == 1


def test_trigger_item_value_form_is_accepted(app_client, redis_client):
    client, settings = app_client
    value = notification(text_message("wamid.V1", "hi"))["entry"][0]["changes"][0]["value"]

    response = client.post("/webhook", json=value)

    assert response.status_code == 200
    assert [p.message_id for p in inbox(redis_client, settings)] == ["wamid.V1"]


def test_several_messages_in_one_notification_are_all_taken(app_client, redis_client):
    client, settings = app_client
    other = "5491155550000"
    body = notification(
        text_message("wamid.A", "hola"),
        text_message("wamid.B", "quiero una cita"),
        text_message("wamid.C", "buenas", sender=other),
        contacts=[
            {"profile": {"name": "Kerry"}, "wa_id": USER},
            {"profile": {"name": "Lucía"}, "wa_id": other},
        ],
    )

    response = client.post("/webhook", json=body)

    assert response.get_json()["queued"] == ["wamid.A", "wamid.B", "wamid.C"]
    assert [p.text for p in inbox(redis_client, settings)] == ["hola", "quiero una cita"]
    (lucia,) = inbox(redis_client, settings, other)
    assert lucia.name == "Lucía"
    assert redis_client.llen(settings.task_queue) == 3


def test_status_only_notification_is_acknowledged_and_ignored(app_client, redis_client):
    client, settings = app_client

    response = client.post(
        "/webhook", json=notification(statuses=[STATUS, {**STATUS, "status": "read"}])
    )

    assert response.status_code == 200
    assert response.get_json()["status"] == "ignored"
    assert response.get_json()["statuses"] == 2
    assert list(redis_client.scan_iter(match=f"{settings.key_prefix}:*")) == []
    assert redis_client.llen(settings.task_queue) == 0


@pytest.mark.parametrize(("message", "kind"), [(IMAGE, "image"), (REACTION, "reaction")])
def test_non_text_message_gets_the_polite_reply_kind(app_client, redis_client, message, kind):
    client, settings = app_client

    assert client.post("/webhook", json=notification(message)).status_code == 200

    (pending,) = inbox(redis_client, settings)
    assert pending.kind == "non_text"
    assert pending.text == f"[{kind}]"
    assert pending.metadata["message_type"] == kind


def test_non_text_messages_can_be_ignored(make_settings, redis_client):
    settings = make_settings(non_text_messages="ignore")
    client = create_app(settings).test_client()

    response = client.post("/webhook", json=notification(IMAGE, REACTION))

    assert response.get_json()["skipped"] == 2
    assert response.get_json()["status"] == "ignored"
    assert inbox(redis_client, settings) == []


@pytest.mark.parametrize(
    ("message", "text"), [(BUTTON_REPLY, "Yes, book it"), (LIST_REPLY, "Tomorrow 10:00")]
)
def test_interactive_replies_are_taken_as_text(app_client, redis_client, message, text):
    client, settings = app_client

    client.post("/webhook", json=notification(message))

    (pending,) = inbox(redis_client, settings)
    assert (pending.kind, pending.text) == ("text", text)


def test_repeated_notification_is_duplicate(app_client, redis_client):
    client, settings = app_client
    body = notification(text_message("wamid.D1", "hola"))
    client.post("/webhook", json=body)

    again = client.post("/webhook", json=copy.deepcopy(body))

    assert again.get_json()["status"] == "duplicate"
    assert again.get_json()["duplicates"] == ["wamid.D1"]
    assert redis_client.llen(settings.task_queue) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"object": "whatsapp_business_account"},
        {"object": "whatsapp_business_account", "entry": "nope"},
        {"object": "whatsapp_business_account", "entry": [{"changes": [{"value": {}}]}]},
        {"messaging_product": "whatsapp", "messages": [{"id": "x"}]},
    ],
)
def test_malformed_whatsapp_bodies_are_422_and_store_nothing(app_client, redis_client, body):
    client, settings = app_client

    response = client.post("/webhook", json=body)

    assert response.status_code == 422
    assert response.get_json()["errors"]
    assert list(redis_client.scan_iter(match=f"{settings.key_prefix}:*")) == []


def post_raw(client, body: dict):
    """POST as JSON text: `json.dumps` escapes a lone surrogate as `\\ud800`, as a client could."""
    return client.post("/webhook", data=json.dumps(body), content_type="application/json")


def assert_refused_naming(response, redis_client, settings, field: str) -> str:
    """A 422 whose only error names `field`, and nothing stored or queued. Returns its text."""
    assert response.status_code == 422
    payload = response.get_json()
    assert payload["error"] == "invalid_payload"
    (problem,) = payload["errors"]
    assert problem["field"] == field
    assert payload["message"].startswith(f"{field}: ")
    assert list(redis_client.scan_iter(match=f"{settings.key_prefix}:*")) == []
    assert redis_client.llen(settings.task_queue) == 0
    return problem["message"]


MESSAGE_0 = "entry.0.changes.0.value.messages.0"


@pytest.mark.parametrize(
    "timestamp",
    ["\u00b2", "1\u2460", "\u0661\u0662", "9" * 4_301, "1" * 13, "", "-5", "12.5", " 12"],
)
def test_timestamp_that_is_not_ascii_digits_is_422(app_client, redis_client, timestamp):
    client, settings = app_client
    message = {**text_message("wamid.TS", "hola"), "timestamp": timestamp}

    response = client.post("/webhook", json=notification(message))

    text = assert_refused_naming(response, redis_client, settings, f"{MESSAGE_0}.timestamp")
    assert "ASCII digits" in text


@pytest.mark.parametrize(
    ("timestamp", "stored"), [(1603059201, 1603059201), ("0", 0), (None, None)]
)
def test_timestamp_as_number_digits_or_absent_is_taken(app_client, redis_client, timestamp, stored):
    client, settings = app_client
    message = {**text_message("wamid.TS", "hola"), "timestamp": timestamp}

    assert client.post("/webhook", json=notification(message)).status_code == 200

    (pending,) = inbox(redis_client, settings)
    assert pending.timestamp == stored


@pytest.mark.parametrize("timestamp", [-1, 10**12, True, 1.5])
def test_timestamp_number_that_is_not_unix_seconds_is_422(app_client, redis_client, timestamp):
    client, settings = app_client
    message = {**text_message("wamid.TS", "hola"), "timestamp": timestamp}

    response = client.post("/webhook", json=notification(message))

    assert_refused_naming(response, redis_client, settings, f"{MESSAGE_0}.timestamp")


def _spoil(body: dict, where: str) -> str:
    """Put a lone surrogate into one stored string of `body`; returns the field's path."""
    value = body["entry"][0]["changes"][0]["value"]
    path = "entry.0.changes.0.value"
    if where in ("phone_number_id", "display_phone_number"):
        value["metadata"][where] += "\ud800"
        return f"{path}.metadata.{where}"
    if where == "name":
        value["contacts"][0]["profile"]["name"] = "Kerry \udfff"
        return f"{path}.contacts.0.profile.name"
    if where == "body":
        value["messages"][0]["text"]["body"] = "hola \ud800"
        return f"{path}.messages.0.text.body"
    value["messages"][0][where] = "\udbff" + value["messages"][0][where]
    return f"{path}.messages.0.{where}"


@pytest.mark.parametrize(
    "where", ["phone_number_id", "display_phone_number", "name", "body", "id", "from", "type"]
)
def test_lone_surrogate_in_a_stored_string_is_422(app_client, redis_client, where):
    client, settings = app_client
    body = notification(text_message("wamid.U1", "hola"))
    field = _spoil(body, where)

    response = post_raw(client, body)

    text = assert_refused_naming(response, redis_client, settings, field)
    assert "lone surrogate" in text


@pytest.mark.parametrize("bad_first", [True, False])
@pytest.mark.parametrize(
    "spoil",
    [
        lambda message: message.update(timestamp="\u00b2"),
        lambda message: message.update(timestamp="9" * 5_000),
        lambda message: message["text"].update(body="\ud800"),
    ],
    ids=["superscript_timestamp", "huge_timestamp", "surrogate_text"],
)
def test_one_bad_message_refuses_the_whole_notification(app_client, redis_client, spoil, bad_first):
    """All or nothing: the good messages are not stored ahead of the refusal, so Meta's
    retry is not half "duplicate"."""
    client, settings = app_client
    bad = text_message("wamid.BAD", "x")
    spoil(bad)
    good = [text_message("wamid.G1", "hola"), text_message("wamid.G2", "otra")]
    messages = [bad, *good] if bad_first else [*good, bad]

    response = post_raw(client, notification(*messages))

    assert response.status_code == 422
    index = 0 if bad_first else 2
    assert response.get_json()["errors"][0]["field"].startswith(
        f"entry.0.changes.0.value.messages.{index}."
    )
    assert list(redis_client.scan_iter(match=f"{settings.key_prefix}:*")) == []
    assert redis_client.llen(settings.task_queue) == 0


def test_bad_metadata_in_a_later_change_refuses_the_whole_notification(app_client, redis_client):
    client, settings = app_client
    body = notification(text_message("wamid.C1", "hola"))
    later = copy.deepcopy(body["entry"][0]["changes"][0])
    later["value"]["metadata"]["phone_number_id"] = "\ud800"
    later["value"]["messages"][0]["id"] = "wamid.C2"
    body["entry"][0]["changes"].append(later)

    response = post_raw(client, body)

    assert_refused_naming(
        response, redis_client, settings, "entry.0.changes.1.value.metadata.phone_number_id"
    )


def test_message_our_rules_refuse_is_still_skipped_not_fatal(app_client, redis_client):
    """Well-formed WhatsApp content we cannot take (an id with a space) is skipped alone,
    as before: only a malformed notification is refused whole."""
    client, settings = app_client
    body = notification(text_message("wamid.OK", "hola"), text_message("wamid. spaced", "x"))

    response = client.post("/webhook", json=body)

    assert response.status_code == 200
    assert (response.get_json()["queued"], response.get_json()["skipped"]) == (["wamid.OK"], 1)
    assert [p.message_id for p in inbox(redis_client, settings)] == ["wamid.OK"]


def test_meta_signed_notification_is_accepted(make_settings, redis_client):
    from webhook.auth import meta_signature

    client = create_app(make_settings(whatsapp_app_secret="app-secret")).test_client()
    body = json.dumps(notification(text_message("wamid.S", "hola"))).encode()

    response = client.post(
        "/webhook",
        data=body,
        content_type="application/json",
        headers={"X-Hub-Signature-256": meta_signature(body, "app-secret")},
    )

    assert response.status_code == 200


# --- Meta's verification handshake -------------------------------------------------------


def test_handshake_echoes_the_challenge_for_the_right_token(app_client):
    client, _ = app_client

    response = client.get(
        "/webhook?hub.mode=subscribe&hub.verify_token=verify-me&hub.challenge=1158201444"
    )

    assert response.status_code == 200
    assert response.get_data(as_text=True) == "1158201444"
    assert response.mimetype == "text/plain"


@pytest.mark.parametrize(
    "query",
    [
        "hub.mode=subscribe&hub.verify_token=wrong&hub.challenge=1",
        "hub.mode=unsubscribe&hub.verify_token=verify-me&hub.challenge=1",
        "hub.mode=subscribe&hub.verify_token=verify-me",
        "",
    ],
)
def test_handshake_refuses_anything_else(app_client, query):
    client, _ = app_client
    response = client.get(f"/webhook?{query}")
    assert response.status_code == 403
    assert response.get_json()["error"] == "forbidden"


def test_handshake_is_refused_when_no_verify_token_is_configured(make_settings, redis_client):
    client = create_app(make_settings()).test_client()
    response = client.get("/webhook?hub.mode=subscribe&hub.verify_token=&hub.challenge=1")
    assert response.status_code == 403


# --- conversation commands -----------------------------------------------------------------


@pytest.mark.parametrize("text", ["/reset", "  REINICIAR ", "Reiniciar"])
def test_reset_words_are_marked_as_reset(app_client, redis_client, text):
    client, settings = app_client
    client.post("/webhook", json={"message_id": "r1", "from": USER, "text": text})
    (pending,) = inbox(redis_client, settings)
    assert pending.kind == "reset"


def test_reset_words_are_configurable(make_settings, redis_client):
    settings = make_settings(reset_commands=["borrar todo"])
    client = create_app(settings).test_client()
    client.post("/webhook", json={"message_id": "r1", "from": USER, "text": "Borrar todo"})
    client.post("/webhook", json={"message_id": "r2", "from": USER, "text": "/reset"})
    assert [p.kind for p in inbox(redis_client, settings)] == ["reset", "text"]


def test_reset_words_from_the_environment_ignore_case_spaces_and_blanks(monkeypatch):
    monkeypatch.setenv("RESET_COMMANDS", " /Reset , REINICIAR,, ")
    assert Settings(_env_file=None).reset_words == frozenset({"/reset", "reiniciar"})
