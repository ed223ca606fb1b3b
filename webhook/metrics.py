"""Webhook counters and `GET /metrics` (Prometheus text format, admin-protected)."""

from __future__ import annotations

from flask import Blueprint, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from common.metrics_setup import registry_for_scrape
from webhook.auth import check_admin_credentials
from webhook.services import services

REQUESTS = Counter(
    "webhook_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
MESSAGES = Counter(
    "webhook_messages_total",
    "Messages by what intake did with them",
    ["outcome"],  # queued, duplicate, rate_limited, inbox_full, skipped
)
STATUSES = Counter("webhook_whatsapp_statuses_total", "WhatsApp status updates ignored")
for _outcome in ("queued", "duplicate", "rate_limited", "inbox_full", "skipped"):
    MESSAGES.labels(_outcome)  # every series shows from the start, at 0

bp = Blueprint("metrics", __name__)


@bp.before_request
def _admin_only() -> Response | None:
    return check_admin_credentials(request, services().settings)


@bp.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(registry_for_scrape()), content_type=CONTENT_TYPE_LATEST)
