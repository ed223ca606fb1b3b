"""Valid callback payloads and outbox entries for tests; each test overrides what it checks."""

from __future__ import annotations

from typing import Any

from common.messages import CallbackPayload, OutboxEntry

SESSION = "+59170000001"
CREATED = 1700000000


def callback_payload(**overrides: Any) -> CallbackPayload:
    values: dict[str, Any] = {
        "to": SESSION,
        "session_id": SESSION,
        "reply": "ok",
        "in_reply_to": ["m0"],
        "conversation_id": "conv_1",
        "metadata": {},
        "model": "tiny",
        "generated_at": "2026-01-01T00:00:00+00:00",
        "latency_ms": 5,
    }
    return CallbackPayload(**(values | overrides))


def outbox_entry(key: str, payload: CallbackPayload | None = None, **overrides: Any) -> OutboxEntry:
    values: dict[str, Any] = {
        "session_id": SESSION,
        "idempotency_key": key,
        "url": "http://127.0.0.1:9/x",
        "payload": payload or callback_payload(),
        "created_at": CREATED,
        "next_attempt_at": CREATED,
    }
    return OutboxEntry(**(values | overrides))
