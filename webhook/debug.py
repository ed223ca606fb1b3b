"""The seeds' Redis debug endpoints, for development only (create_app registers this
blueprint only when ENVIRONMENT=development) and behind ADMIN_TOKEN when one is set."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from webhook.auth import check_admin_credentials
from webhook.services import services

bp = Blueprint("debug", __name__, url_prefix="/redis")


@bp.before_request
def _admin_only() -> Response | None:
    return check_admin_credentials(request, services().settings)


@bp.get("/test")
def redis_test() -> Response:
    """Write, read and delete a probe key: proves the connection works end to end."""
    svc = services()
    key = f"{svc.settings.key_prefix}:debug:probe"
    svc.redis.set(key, "ok", ex=10)
    value = svc.redis.get(key)
    svc.redis.delete(key)
    return jsonify(status="ok" if value == "ok" else "error", redis_version=_version())


@bp.get("/stats")
def redis_stats() -> Response:
    svc = services()
    info = svc.redis.info()
    prefix = svc.settings.key_prefix
    return jsonify(
        redis_version=info.get("redis_version"),
        used_memory_human=info.get("used_memory_human"),
        connected_clients=info.get("connected_clients"),
        conversations=_count(f"{prefix}:{{*}}:conversation"),
        pending_inboxes=_count(f"{prefix}:{{*}}:inbox"),
    )


@bp.delete("/clear")
def redis_clear() -> Response:
    """Delete this deployment's keys (its prefix only; never FLUSHALL someone's Redis)."""
    svc = services()
    deleted = 0
    batch: list[str] = []
    for key in svc.redis.scan_iter(match=f"{svc.settings.key_prefix}:*", count=500):
        batch.append(key)
        if len(batch) == 500:
            deleted += svc.redis.delete(*batch)
            batch.clear()
    if batch:
        deleted += svc.redis.delete(*batch)
    return jsonify(status="cleared", deleted=deleted)


def _version() -> str | None:
    return services().redis.info("server").get("redis_version")


def _count(pattern: str) -> int:
    return sum(1 for _ in services().redis.scan_iter(match=pattern, count=500))
