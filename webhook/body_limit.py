"""Bodies sent without a Content-Length (chunked) are held to MAX_BODY_BYTES as well.

Flask refuses a body whose Content-Length is above `MAX_CONTENT_LENGTH` with a 413, but a
chunked body has no length to check: Werkzeug reads it up to the limit and silently
drops the rest, so an oversized message came out as "not valid JSON" (or a signature
mismatch). Here such a body is read up to one byte past the limit before the app sees
it, and handed on with its real length, or with one that Flask then refuses with its
own 413.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from typing import Any

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class ChunkedBodyLimit:
    """WSGI middleware: give a body without Content-Length a length, at most limit + 1."""

    def __init__(self, app: WSGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        # gunicorn marks a body it can read to its end (chunked) as terminated; without
        # that mark and without a length, Werkzeug treats the body as empty anyway. A
        # Content-Length beside chunked encoding means nothing (RFC 9112, 6.3).
        chunked = environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"
        unsized = chunked or not environ.get("CONTENT_LENGTH")
        if unsized and environ.get("wsgi.input_terminated"):
            body = environ["wsgi.input"].read(self.limit + 1)
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))  # above the limit: Flask's 413
            # Werkzeug ignores Content-Length next to chunked encoding; the body is whole now.
            environ.pop("HTTP_TRANSFER_ENCODING", None)
        return self.app(environ, start_response)
