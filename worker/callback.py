"""Posting a reply to n8n: one attempt, classified as delivered, retryable or permanent.

The retry schedule lives in the task that calls this (a scheduled Celery retry, not a
sleep), so a slow n8n never holds a worker that could answer other conversations.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import lru_cache
from time import monotonic, time
from urllib.parse import urlsplit

import requests
import urllib3
from requests.utils import get_environ_proxies
from standardwebhooks.webhooks import Webhook

from common.messages import CallbackPayload
from common.settings import Settings

IDEMPOTENCY_HEADER = "Idempotency-Key"
USER_AGENT = "n8n-whatsapp-reply-worker/0.1"
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_PREPARED_URLS = 64
BODY_CHUNK_BYTES = 16 * 1024
# A request that can never be sent as configured; retrying cannot help.
PERMANENT_REQUEST_ERRORS = (
    requests.exceptions.InvalidURL,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    requests.exceptions.InvalidHeader,
)


class CallbackError(Exception):
    """A failed delivery; `retryable` says whether trying again can help."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds from now; it may be a number or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:  # HTTP dates without a zone (asctime form) are GMT
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - (now if now is not None else time()))


def backoff_seconds(
    attempt: int,
    *,
    base: float,
    cap: float = 300.0,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Exponential backoff with jitter (half to full step); a server's Retry-After wins."""
    step = min(cap, base * (2**attempt))
    delay = step * (0.5 + (rng or random).random() / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


@lru_cache(maxsize=64)
def _proxies_for(origin: str) -> dict[str, str]:
    """HTTP(S)_PROXY / NO_PROXY for one callback origin, read once per process."""
    return get_environ_proxies(origin)


class CallbackClient:
    """One reused HTTP session per worker process (keeps connections to n8n open).

    With a secret, every attempt is signed the Standard Webhooks way: `webhook-id` is the
    idempotency key (stable across retries), `webhook-timestamp` the time of this attempt,
    `webhook-signature` an HMAC-SHA256 over id, timestamp and the exact body sent.
    """

    def __init__(
        self,
        timeout: float,
        session: requests.Session | None = None,
        secret: str | None = None,
        clock: Callable[[], float] = time,
    ) -> None:
        self._timeout = timeout
        self._session = session or requests.Session()
        self._session.headers.update({"User-Agent": USER_AGENT})
        # Requests are prepared here rather than by Session.request, whose merging of
        # session settings into each request cost ~25% of a callback's CPU (bench/HISTORY.md);
        # the session still sends them, over its kept-alive connections.
        self._base_headers = dict(self._session.headers)
        # requests would read the proxy and CA-bundle variables on every request (~4% of
        # a worker's CPU with an instant model); they are read once instead.
        self._session.trust_env = False
        self._verify: str | bool = (
            os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        )
        self._signer = Webhook(secret) if secret else None
        self._clock = clock
        self._templates: dict[str, requests.PreparedRequest] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> CallbackClient:
        secret = settings.callback_secret
        return cls(
            timeout=settings.callback_timeout_seconds,
            secret=secret.get_secret_value() if secret else None,
        )

    def _signature_headers(self, idempotency_key: str, body: str) -> dict[str, str]:
        if self._signer is None:
            return {}
        moment = datetime.fromtimestamp(int(self._clock()), UTC)
        return {
            "webhook-id": idempotency_key,
            "webhook-timestamp": str(int(moment.timestamp())),
            "webhook-signature": self._signer.sign(idempotency_key, moment, body),
        }

    def _prepared_for(self, url: str) -> requests.PreparedRequest:
        """A POST to `url` with the fixed headers, prepared once per URL (a worker has one
        or a few): each callback copies it and adds its own headers and body. Preparing
        the URL, headers and auth afresh cost 43 µs per callback, the copy 8 µs."""
        template = self._templates.get(url)
        if template is None:
            template = requests.PreparedRequest()
            template.prepare(
                method="POST",
                url=url,
                headers={**self._base_headers, "Content-Type": "application/json"},
                hooks=self._session.hooks,
            )
            if len(self._templates) >= MAX_PREPARED_URLS:
                self._templates.clear()
            self._templates[url] = template
        return template

    @staticmethod
    def _read_body(response: requests.Response, deadline: float) -> None:
        """Read the answer's body until its end or until `deadline`, whichever is first.

        requests' timeout bounds each wait for the server, not the whole answer: a body
        that trickles in a byte at a time would hold the session's lock (and a worker
        thread) for as long as the server likes, while the recovery sweep counts an
        attempt as lost after CALLBACK_TIMEOUT_SECONDS. The status line has already said
        how the attempt went, so a body cut short changes nothing but the connection: read
        to its end, it goes back to the session's pool; cut short, it is closed.
        """
        raw = response.raw
        try:
            # read1: what has arrived, in one wait; `read` would wait for a full chunk.
            while raw.read1(BODY_CHUNK_BYTES, decode_content=False):
                if monotonic() > deadline:
                    return
            raw.release_conn()
        finally:
            response.close()

    def post(self, url: str, payload: CallbackPayload, idempotency_key: str) -> int:
        """POST the reply; the status code on 2xx, else CallbackError."""
        body = payload.model_dump_json()
        headers = {
            IDEMPOTENCY_HEADER: idempotency_key,
            **self._signature_headers(idempotency_key, body),
        }
        try:
            request = self._prepared_for(url).copy()
            request.headers.update(headers)
            request.prepare_body(body.encode(), None)
            started = monotonic()
            response = self._session.send(
                request,
                timeout=self._timeout,
                allow_redirects=False,
                proxies=_proxies_for(_origin(url)),
                verify=self._verify,
                stream=True,
            )
            self._read_body(response, deadline=started + self._timeout)
        except PERMANENT_REQUEST_ERRORS as exc:
            raise CallbackError(f"{exc.__class__.__name__}: {exc}", retryable=False) from exc
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            # Connection, timeout, cut-off response...: the idempotency key makes a retry safe.
            raise CallbackError(f"{exc.__class__.__name__}: {exc}", retryable=True) from exc
        status = response.status_code
        if 200 <= status < 300:
            return status
        raise CallbackError(
            f"callback answered {status}",
            retryable=status in RETRYABLE_STATUS,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )
