"""Liveness (`/health`, no dependencies) and readiness (`/ready`: Redis takes writes; workers)."""

from __future__ import annotations

import kombu.exceptions
import redis
from flask import Blueprint, Response, jsonify

from common.keys import ready_probe, worker_heartbeat_pattern
from webhook.errors import REDIS_DOWN_RETRY_AFTER, error_response, redis_refuses_for_now
from webhook.services import services

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> Response:
    return jsonify(status="ok")


@bp.get("/ready")
def ready() -> Response | tuple[Response, int]:
    svc = services()
    try:
        svc.redis.set(ready_probe(svc.settings.key_prefix), "1", px=5000)
        pattern = worker_heartbeat_pattern(svc.settings.key_prefix)
        workers = sorted(
            key.rsplit(":", 1)[-1] for key in svc.redis.scan_iter(match=pattern, count=100)
        )
    except (redis.RedisError, kombu.exceptions.OperationalError) as exc:
        if not redis_refuses_for_now(exc):
            raise  # a bug, not an outage: the 500 handler logs it
        message = f"Redis cannot take writes ({exc.__class__.__name__})."
        response = error_response(503, "unavailable", message, redis="down")
        response.headers["Retry-After"] = str(REDIS_DOWN_RETRY_AFTER)
        return response
    return jsonify(status="ready", redis="ok", workers_seen=len(workers), workers=workers), 200
