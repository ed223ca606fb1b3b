"""`POST /webhook`: check the message, store it once, queue a reply task, answer at once.
`GET /webhook`: Meta's subscription handshake."""

from __future__ import annotations

import hmac
import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request
from pydantic import ValidationError

from common.inbox import AcceptResult, QueuedTask
from common.keys import SessionKeys, session_keys
from common.messages import InboundMessage, PendingMessage
from common.privacy import mask_phone
from common.queue import send_reply_task
from webhook.auth import check_webhook_credentials
from webhook.errors import UNAVAILABLE, error_response
from webhook.metrics import MESSAGES, STATUSES
from webhook.payloads import parse_body
from webhook.request_log import note
from webhook.services import PUBLISH_RETRY_POLICY, Services, services

log = logging.getLogger(__name__)
bp = Blueprint("intake", __name__)

PENDING_FULL_RETRY_AFTER = 10


def _field_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """pydantic's errors reduced to what a client needs: which field, what is wrong."""
    return [
        {
            "field": ".".join(str(part) for part in err["loc"]) or "body",
            "message": err["msg"].removeprefix("Value error, "),
        }
        for err in exc.errors(include_url=False, include_input=False)
    ]


def _invalid(errors: list[dict[str, Any]]) -> Response:
    first = errors[0]
    return error_response(
        422, "invalid_payload", f"{first['field']}: {first['message']}", errors=errors
    )


def _json_object() -> dict[str, Any] | Response:
    if not request.is_json:
        return error_response(
            415, "unsupported_media_type", "Send JSON with Content-Type: application/json."
        )
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        # json's parser recurses once per level and silent=True only swallows ValueError;
        # nesting this deep is never a message (metadata stops at 32 levels).
        return error_response(400, "invalid_json", "The JSON body is nested too deeply.")
    if body is None:
        return error_response(400, "invalid_json", "The request body is not valid JSON.")
    if not isinstance(body, dict):
        return error_response(422, "invalid_payload", "The JSON body must be an object.")
    return body


def _callback_problem(inbound: InboundMessage, svc: Services) -> Response | None:
    if inbound.callback_url is not None and not svc.callback_hosts.allows(
        str(inbound.callback_url)
    ):
        return _invalid(
            [{"field": "callback_url", "message": "host is not on CALLBACK_ALLOWED_HOSTS"}]
        )
    if inbound.callback_url is None and svc.settings.n8n_callback_url is None:
        return _invalid(
            [{"field": "callback_url", "message": "required, because N8N_CALLBACK_URL is not set"}]
        )
    return None


def _accept(svc: Services, message: PendingMessage) -> AcceptResult:
    """Store the message once and queue its task, atomically when the broker allows it.

    With the broker on the same Redis, one script stores and queues (one round trip).
    With another broker, the task is published after the store, and the store is undone
    if publishing fails. Either way no task is sent while a worker holds the session: it
    answers the message after releasing the lock.
    """
    keys = session_keys(svc.settings.key_prefix, message.session_id)
    task = None
    if svc.queue_in_accept:
        task = QueuedTask(svc.settings.task_queue, svc.reply_tasks.build(message.session_id))
    result = svc.inbox.accept(keys, message, task)
    MESSAGES.labels(result.status).inc()
    if result.status != "queued":
        return result
    if task is None and result.needs_task:
        _publish_or_withdraw(svc, keys, message)
    note(
        f"queued message_id={message.message_id} from={mask_phone(message.sender)}"
        f" kind={message.kind} pending={result.pending}"
        f" task={'sent' if result.needs_task else 'none (a worker holds the session)'}"
    )
    return result


def _publish_or_withdraw(svc: Services, keys: SessionKeys, message: PendingMessage) -> None:
    try:
        send_reply_task(
            svc.celery, message.session_id, retry=True, retry_policy=PUBLISH_RETRY_POLICY
        )
    except UNAVAILABLE:
        # Undo, so the client's retry is accepted as new instead of answered "duplicate".
        try:
            svc.inbox.withdraw(keys, message)
        except UNAVAILABLE:
            log.error("message %s stays in the inbox for the recovery sweep", message.message_id)
        raise


def _too_many(result: AcceptResult) -> Response:
    response = error_response(
        429, result.status, "Too many messages for this conversation; retry later."
    )
    response.headers["Retry-After"] = str(result.retry_after or PENDING_FULL_RETRY_AFTER)
    return response


@bp.post("/webhook")
def receive() -> Response | tuple[Response, int]:
    svc = services()
    if (denied := check_webhook_credentials(request, svc.settings)) is not None:
        return denied
    body = _json_object()
    if isinstance(body, Response):
        return body
    try:
        parsed = parse_body(body, svc.settings)
    except ValidationError as exc:
        return _invalid(_field_errors(exc))
    if parsed.skipped:  # (an increment by 0 would still write the shared metrics file)
        MESSAGES.labels("skipped").inc(parsed.skipped)
    if parsed.statuses:
        STATUSES.inc(parsed.statuses)
    for inbound, _ in parsed.messages:
        if (problem := _callback_problem(inbound, svc)) is not None:
            return problem
    # Every message is checked and converted before the first is stored: a notification
    # refused half-way would leave its first messages queued, then "duplicate" on retry.
    messages = [PendingMessage.from_inbound(inbound, kind) for inbound, kind in parsed.messages]

    if not parsed.whatsapp:
        (message,) = messages
        result = _accept(svc, message)
        if result.status == "duplicate":
            return jsonify(status="duplicate", message_id=message.message_id), 200
        if result.status != "queued":
            return _too_many(result)
        return jsonify(
            status="queued",
            message_id=message.message_id,
            session_id=message.session_id,
            pending=result.pending,
        ), 202

    queued, duplicates, refused = [], [], None
    for message in messages:
        result = _accept(svc, message)
        if result.status == "queued":
            queued.append(message.message_id)
        elif result.status == "duplicate":
            duplicates.append(message.message_id)
        else:
            refused = refused or result
    if refused is not None:
        return _too_many(refused)  # Meta retries; what was queued answers "duplicate" then
    # Meta and n8n only need a 2xx, quickly; the counts help whoever reads the response.
    return jsonify(
        status="queued" if queued else ("duplicate" if duplicates else "ignored"),
        queued=queued,
        duplicates=duplicates,
        statuses=parsed.statuses,
        skipped=parsed.skipped,
    ), 200


@bp.get("/webhook")
def verify_subscription() -> Response | tuple[str, int, dict[str, str]]:
    """Meta's handshake: echo `hub.challenge` when `hub.verify_token` is ours."""
    expected = services().settings.whatsapp_verify_token
    mode = request.args.get("hub.mode", "")
    token = request.args.get("hub.verify_token", "")
    challenge = request.args.get("hub.challenge", "")
    if (
        expected is not None
        and mode == "subscribe"
        and 0 < len(challenge) <= 256
        and hmac.compare_digest(token.encode(), expected.get_secret_value().encode())
    ):
        return challenge, 200, {"Content-Type": "text/plain; charset=utf-8"}
    return error_response(403, "forbidden", "Verification token mismatch.")
