"""Every error leaves as JSON: clients (n8n) read `error` and `message`, never HTML."""

from __future__ import annotations

import logging

import kombu.exceptions
import redis
from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

REDIS_DOWN_RETRY_AFTER = 5

# Redis cannot take the message now, but will: unreachable, loading its data, a read-only
# replica or one cut off from its master (until the failover ends), or full (maxmemory
# with noeviction).
UNAVAILABLE = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    redis.ReadOnlyError,
    redis.OutOfMemoryError,
    redis.exceptions.MasterDownError,
    redis.exceptions.TryAgainError,
    kombu.exceptions.OperationalError,
)
# Refusals that redis-py raises as a plain ResponseError, known by their error code:
# writes stopped after a failed snapshot (often a full disk), too few replicas.
REFUSAL_CODES = frozenset({"MISCONF", "NOREPLICAS"})


def redis_refuses_for_now(exc: BaseException) -> bool:
    """Whether `exc` says Redis cannot serve the request now, rather than that it is
    wrong (which is a bug of ours, and a 500)."""
    if isinstance(exc, UNAVAILABLE):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).split(" ", 1)[0] in REFUSAL_CODES


def error_response(status: int, error: str, message: str, **extra: object) -> Response:
    response = jsonify({"error": error, "message": message, **extra})
    response.status_code = status
    return response


def _http_error(exc: HTTPException) -> Response:
    code = exc.code or 500
    name = (exc.name or "error").lower().replace(" ", "_")
    response = error_response(code, name, exc.description or name)
    for header, value in exc.get_headers():  # e.g. a 405's Allow
        if header.lower() != "content-type":
            response.headers[header] = value
    return response


def _unavailable(exc: Exception) -> Response:
    log.warning("redis unavailable: %s", exc.__class__.__name__)
    response = error_response(
        503, "unavailable", "Redis cannot take requests right now; try again shortly."
    )
    response.headers["Retry-After"] = str(REDIS_DOWN_RETRY_AFTER)
    return response


def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error")
    return error_response(500, "internal_error", "Unexpected server error.")


def _redis_error(exc: redis.ResponseError) -> Response:
    return _unavailable(exc) if redis_refuses_for_now(exc) else _unexpected(exc)


def register(app: Flask) -> None:
    app.register_error_handler(HTTPException, _http_error)
    for exc_type in UNAVAILABLE:
        app.register_error_handler(exc_type, _unavailable)
    app.register_error_handler(redis.ResponseError, _redis_error)
    app.register_error_handler(Exception, _unexpected)
