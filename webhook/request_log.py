"""One log line and one counter per request, without personal data.

gunicorn's access log would print paths such as `/chat/history/+59112345678`; this line
names the route pattern instead, so a phone number never reaches the logs.
"""

from __future__ import annotations

import logging
import time

from flask import Flask, Response, g, request

from webhook.metrics import REQUESTS

log = logging.getLogger("webhook.access")


def _start() -> None:
    g.request_started = time.perf_counter()


def _log(response: Response) -> Response:
    started = g.pop("request_started", None)
    elapsed_ms = (time.perf_counter() - started) * 1000 if started is not None else -1.0
    route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    log.info("%s %s %d %.1fms", request.method, route, response.status_code, elapsed_ms)
    REQUESTS.labels(request.method, route, str(response.status_code)).inc()
    return response


def register(app: Flask) -> None:
    app.before_request(_start)
    app.after_request(_log)
