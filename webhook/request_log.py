"""One log line and one counter per request, without personal data.

gunicorn's access log would print paths such as `/chat/history/+59112345678`; this line
names the route pattern instead, so a phone number never reaches the logs. Handlers add
what the request did (`note`) to the same line: one write per request, not one per fact.
"""

from __future__ import annotations

import logging
import time

from flask import Flask, Response, g, request

from webhook.metrics import REQUESTS

log = logging.getLogger("webhook.access")


def note(detail: str) -> None:
    """Append `detail` to this request's log line (it must hold no personal data)."""
    g.setdefault("log_notes", []).append(detail)


def _start() -> None:
    g.request_started = time.perf_counter()


def _log(response: Response) -> Response:
    started = g.pop("request_started", None)
    elapsed_ms = (time.perf_counter() - started) * 1000 if started is not None else -1.0
    route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    notes = g.pop("log_notes", None)
    log.info(
        "%s %s %d %.1fms%s",
        request.method,
        route,
        response.status_code,
        elapsed_ms,
        " " + "; ".join(notes) if notes else "",
    )
    REQUESTS.labels(request.method, route, str(response.status_code)).inc()
    return response


def register(app: Flask) -> None:
    app.before_request(_start)
    app.after_request(_log)
