"""Who may call the webhook and the admin endpoints.

Inbound messages: a shared token (`Authorization: Bearer …` or `X-Webhook-Token`, what
n8n's Header Auth credential sends) or Meta's HMAC-SHA256 of the raw body in
`X-Hub-Signature-256`. Admin endpoints: ADMIN_TOKEN in `Authorization: Bearer …` or
`X-Admin-Token`. Every comparison is constant-time, and a refusal says nothing about
which part was wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from flask import Request, Response
from pydantic import SecretStr

from common.settings import Settings
from webhook.errors import error_response

log = logging.getLogger(__name__)


def _presented_tokens(request: Request, header: str) -> list[str]:
    tokens = []
    authorization = request.headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        tokens.append(value.strip())
    if request.headers.get(header):
        tokens.append(request.headers[header].strip())
    return tokens


def _token_matches(request: Request, header: str, secret: SecretStr) -> bool:
    expected = secret.get_secret_value().encode()
    return any(
        hmac.compare_digest(token.encode(), expected)
        for token in _presented_tokens(request, header)
    )


def meta_signature(body: bytes, app_secret: str) -> str:
    """The `X-Hub-Signature-256` value Meta sends for a body."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def _signature_matches(request: Request, secret: SecretStr) -> bool:
    presented = request.headers.get("X-Hub-Signature-256", "")
    if not presented:
        return False
    expected = meta_signature(request.get_data(cache=True), secret.get_secret_value())
    return hmac.compare_digest(presented.strip().lower().encode(), expected.encode())


def unauthorized() -> Response:
    response = error_response(401, "unauthorized", "Missing or invalid credentials.")
    response.headers["WWW-Authenticate"] = 'Bearer realm="webhook"'
    return response


def check_webhook_credentials(request: Request, settings: Settings) -> Response | None:
    """None if the caller may post messages, else the 401 to send."""
    token, app_secret = settings.webhook_token, settings.whatsapp_app_secret
    if token is None and app_secret is None:
        return None  # development without credentials (create_app warned about it)
    if token is not None and _token_matches(request, "X-Webhook-Token", token):
        return None
    if app_secret is not None and _signature_matches(request, app_secret):
        return None
    return unauthorized()


def check_admin_credentials(request: Request, settings: Settings) -> Response | None:
    """None if the caller may use admin endpoints, else the 401 to send."""
    if settings.admin_token is None:
        return None if not settings.is_production else unauthorized()
    if _token_matches(request, "X-Admin-Token", settings.admin_token):
        return None
    return unauthorized()


def check_startup(settings: Settings) -> None:
    """Refuse an open webhook in production; warn loudly about one in development."""
    if settings.webhook_token is None and settings.whatsapp_app_secret is None:
        if settings.is_production:
            raise RuntimeError(
                "ENVIRONMENT=production needs WEBHOOK_TOKEN or WHATSAPP_APP_SECRET: "
                "refusing to start a webhook anyone can post to"
            )
        log.warning(
            "SECURITY: no WEBHOOK_TOKEN or WHATSAPP_APP_SECRET set; anyone who can reach "
            "this webhook can post messages (allowed only because ENVIRONMENT=development)"
        )
    if settings.n8n_callback_url is None and not settings.callback_allowed_hosts:
        log.warning(
            "neither N8N_CALLBACK_URL nor CALLBACK_ALLOWED_HOSTS is set: every message "
            "will be refused, since no callback URL is allowed"
        )
    if settings.admin_token is None and not settings.is_production:
        log.warning(
            "SECURITY: no ADMIN_TOKEN set; the admin endpoints are open (development): "
            "/chat/history (read and delete conversations), /metrics and the debug "
            "/redis/* endpoints (including DELETE /redis/clear)"
        )
