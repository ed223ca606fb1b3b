"""`/chat/history/<session>`: read or erase one conversation."""

from __future__ import annotations

import re

from flask import Blueprint, Response, jsonify, request

from common.keys import session_keys
from common.messages import IDENTIFIER_CHAR
from webhook.auth import check_admin_credentials
from webhook.errors import error_response
from webhook.services import services

bp = Blueprint("history", __name__, url_prefix="/chat/history")


@bp.before_request
def _admin_only() -> Response | None:
    return check_admin_credentials(request, services().settings)


_SESSION_ID = re.compile(rf"^{IDENTIFIER_CHAR}{{1,128}}$")  # as the webhook accepts them


def _bad_session(session_id: str) -> Response | None:
    if _SESSION_ID.match(session_id):
        return None
    return error_response(400, "invalid_session_id", "session_id has invalid characters or length.")


@bp.get("/<path:session_id>")
def read(session_id: str) -> Response | tuple[Response, int]:
    if (bad := _bad_session(session_id)) is not None:
        return bad
    svc = services()
    conversation = svc.store.history(session_keys(svc.settings.key_prefix, session_id))
    if conversation is None:
        return error_response(404, "not_found", "No conversation for this session.")
    return jsonify(conversation.model_dump()), 200


@bp.delete("/<path:session_id>")
def erase(session_id: str) -> Response | tuple[Response, int]:
    if (bad := _bad_session(session_id)) is not None:
        return bad
    svc = services()
    if not svc.store.erase(session_keys(svc.settings.key_prefix, session_id)):
        return error_response(404, "not_found", "No conversation for this session.")
    return jsonify(status="deleted", session_id=session_id), 200
