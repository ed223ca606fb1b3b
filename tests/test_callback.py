"""The callback client: one POST to n8n, classified as delivered, retryable or permanent.

HTTP is faked with `responses`, except at the end, where a server on loopback plays n8n
for what only real sockets show (an answer that trickles in, kept-alive connections).
"""

from __future__ import annotations

import json
import os
import random
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from itertools import pairwise
from typing import Any

import pytest
import requests
import responses
from requests.adapters import HTTPAdapter

from common.messages import CallbackPayload
from worker.callback import (
    IDEMPOTENCY_HEADER,
    RETRYABLE_STATUS,
    CallbackClient,
    CallbackError,
    backoff_seconds,
    parse_retry_after,
)

URL = "https://n8n.example.test/webhook/reply"
KEY = "reply-5511999990000-wamid.HBgM-0001"


@pytest.fixture
def payload() -> CallbackPayload:
    return CallbackPayload(
        to="5511999990000",
        session_id="5511999990000",
        reply="¡Hola! Your order ships tomorrow 📦",
        in_reply_to=["wamid.HBgM-0001", "wamid.HBgM-0002"],
        conversation_id="conv-42",
        metadata={"channel": "whatsapp", "nested": {"n": 1, "ok": True}},
        model="tiny-test-model",
        generated_at="2024-05-01T12:00:00+00:00",
        latency_ms=321,
    )


@pytest.fixture
def fake_http() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def post_expecting_error(
    client: CallbackClient, payload: CallbackPayload, url: str = URL
) -> CallbackError:
    with pytest.raises(CallbackError) as info:
        client.post(url, payload, KEY)
    return info.value


# --- success and what is sent ----------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_2xx_returns_the_status(
    fake_http: responses.RequestsMock, payload: CallbackPayload, status: int
) -> None:
    fake_http.post(URL, status=status)

    assert CallbackClient(timeout=5).post(URL, payload, KEY) == status
    assert len(fake_http.calls) == 1


def test_request_body_is_exactly_the_payload_json(
    fake_http: responses.RequestsMock, payload: CallbackPayload
) -> None:
    fake_http.post(URL, status=200)

    CallbackClient(timeout=5).post(URL, payload, KEY)

    request = fake_http.calls[0].request
    body = request.body.decode("utf-8") if isinstance(request.body, bytes) else request.body
    assert json.loads(body) == payload.model_dump()
    # The declared length must match the UTF-8 bytes that go on the wire (the reply has
    # non-ASCII characters, so a character count would be wrong).
    assert int(request.headers["Content-Length"]) == len(body.encode("utf-8"))


def test_request_headers(fake_http: responses.RequestsMock, payload: CallbackPayload) -> None:
    fake_http.post(URL, status=200)

    CallbackClient(timeout=5).post(URL, payload, KEY)

    request = fake_http.calls[0].request
    assert request.method == "POST"
    assert request.headers["Content-Type"] == "application/json"
    assert IDEMPOTENCY_HEADER == "Idempotency-Key"
    assert request.headers["Idempotency-Key"] == KEY
    user_agent = request.headers.get("User-Agent", "")
    assert user_agent
    assert not user_agent.startswith("python-requests/"), "the default UA was not replaced"


def test_each_call_sends_its_own_idempotency_key(
    fake_http: responses.RequestsMock, payload: CallbackPayload
) -> None:
    fake_http.post(URL, status=200)
    client = CallbackClient(timeout=5)

    client.post(URL, payload, "key-one")
    client.post(URL, payload, "key-two")

    sent = [call.request.headers["Idempotency-Key"] for call in fake_http.calls]
    assert sent == ["key-one", "key-two"]


def test_each_call_sends_its_own_body_to_its_own_url(
    fake_http: responses.RequestsMock, payload: CallbackPayload
) -> None:
    other_url = "https://other.example.test/webhook/reply"
    fake_http.post(URL, status=200)
    fake_http.post(other_url, status=200)
    client = CallbackClient(timeout=5)
    short = payload.model_copy(update={"reply": "ok"})

    client.post(URL, payload, "key-one")
    client.post(other_url, short, "key-two")
    client.post(URL, short, "key-three")

    sent = [
        (call.request.url, json.loads(call.request.body)["reply"], call.request.headers)
        for call in fake_http.calls
    ]
    assert [(url, reply) for url, reply, _ in sent] == [
        (URL, payload.reply),
        (other_url, "ok"),
        (URL, "ok"),
    ]
    assert [int(headers["Content-Length"]) for _, _, headers in sent] == [
        len(call.request.body) for call in fake_http.calls
    ]


def test_credentials_in_the_url_are_sent_as_basic_auth(
    fake_http: responses.RequestsMock, payload: CallbackPayload
) -> None:
    with_credentials = URL.replace("https://", "https://n8n:s3cret@")
    fake_http.post(with_credentials, status=200)

    CallbackClient(timeout=5).post(with_credentials, payload, KEY)

    assert fake_http.calls[0].request.headers["Authorization"] == "Basic bjhuOnMzY3JldA=="


@pytest.mark.parametrize("timeout", [0.25, 3.5, 30.0])
def test_the_configured_timeout_is_used(
    fake_http: responses.RequestsMock, payload: CallbackPayload, timeout: float
) -> None:
    fake_http.post(URL, status=200)

    CallbackClient(timeout=timeout).post(URL, payload, KEY)

    assert fake_http.calls[0].request.req_kwargs["timeout"] == timeout


# --- retryable and permanent statuses --------------------------------------------------


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retryable(
    fake_http: responses.RequestsMock, payload: CallbackPayload, status: int
) -> None:
    fake_http.post(URL, status=status)

    error = post_expecting_error(CallbackClient(timeout=5), payload)

    assert error.retryable is True
    assert error.retry_after is None
    assert str(status) in str(error)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 410, 413, 422, 501])
def test_client_errors_are_permanent(
    fake_http: responses.RequestsMock, payload: CallbackPayload, status: int
) -> None:
    fake_http.post(URL, status=status)

    error = post_expecting_error(CallbackClient(timeout=5), payload)

    assert error.retryable is False
    assert str(status) in str(error)


def test_retryable_status_set_matches_the_contract() -> None:
    for status in (408, 429, 500, 502, 503, 504):
        assert status in RETRYABLE_STATUS
    for status in (400, 401, 403, 404, 410, 422, 301, 302):
        assert status not in RETRYABLE_STATUS


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds_are_reported(
    fake_http: responses.RequestsMock, payload: CallbackPayload, status: int
) -> None:
    fake_http.post(URL, status=status, headers={"Retry-After": "7"})

    error = post_expecting_error(CallbackClient(timeout=5), payload)

    assert error.retryable is True
    assert error.retry_after == 7


def test_retry_after_http_date_on_a_response_is_seconds_from_now(
    fake_http: responses.RequestsMock, payload: CallbackPayload
) -> None:
    when = datetime.fromtimestamp(time.time() + 120, tz=UTC)
    fake_http.post(URL, status=503, headers={"Retry-After": format_datetime(when, usegmt=True)})

    error = post_expecting_error(CallbackClient(timeout=5), payload)

    # The header has whole-second precision and a little time passes during the call.
    assert error.retry_after is not None
    assert 115 <= error.retry_after <= 120


def test_garbage_retry_after_on_a_response_is_ignored(
    fake_http: responses.RequestsMock, payload: CallbackPayload
) -> None:
    fake_http.post(URL, status=503, headers={"Retry-After": "soon, maybe"})

    error = post_expecting_error(CallbackClient(timeout=5), payload)

    assert error.retryable is True
    assert error.retry_after is None


def test_undecimal_digit_retry_after_still_gives_a_callback_error(
    fake_http: responses.RequestsMock, payload: CallbackPayload
) -> None:
    fake_http.post(URL, status=503, headers={"Retry-After": "²"})

    error = post_expecting_error(CallbackClient(timeout=5), payload)

    assert error.retryable is True
    assert error.retry_after is None


# --- redirects and network errors ------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_is_not_followed_and_is_permanent(
    fake_http: responses.RequestsMock, payload: CallbackPayload, status: int
) -> None:
    target = "https://elsewhere.example.test/landing"
    fake_http.post(URL, status=status, headers={"Location": target})
    post_target = fake_http.post(target, status=200)
    get_target = fake_http.get(target, status=200)

    error = post_expecting_error(CallbackClient(timeout=5), payload)

    assert error.retryable is False
    assert str(status) in str(error)
    assert post_target.call_count == 0
    assert get_target.call_count == 0
    assert [call.request.url for call in fake_http.calls] == [URL]


@pytest.mark.parametrize(
    "exc",
    [
        requests.ConnectionError("connection refused"),
        requests.Timeout("timed out"),
        requests.exceptions.ConnectTimeout("connect timed out"),
        requests.exceptions.ReadTimeout("read timed out"),
    ],
    ids=["ConnectionError", "Timeout", "ConnectTimeout", "ReadTimeout"],
)
def test_network_errors_are_retryable(
    fake_http: responses.RequestsMock, payload: CallbackPayload, exc: Exception
) -> None:
    fake_http.post(URL, body=exc)

    error = post_expecting_error(CallbackClient(timeout=5), payload)

    assert error.retryable is True
    assert error.retry_after is None
    assert error.__cause__ is exc


# --- session reuse ---------------------------------------------------------------------


class RecordingAdapter(HTTPAdapter):
    """An adapter (one connection pool) that records every request it sends."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    def send(self, request, **kwargs):  # type: ignore[no-untyped-def, override]
        self.sent.append(request.headers.get(IDEMPOTENCY_HEADER))
        return super().send(request, **kwargs)


def test_a_given_session_is_used_for_every_post(
    fake_http: responses.RequestsMock, payload: CallbackPayload
) -> None:
    fake_http.post(URL, status=200)
    session = requests.Session()
    adapter = RecordingAdapter()
    session.mount("https://", adapter)
    hooked: list[int] = []
    session.hooks["response"].append(lambda response, **_: hooked.append(response.status_code))

    client = CallbackClient(timeout=5, session=session)
    client.post(URL, payload, "first")
    client.post(URL, payload, "second")
    client.post(URL, payload, "third")

    # All three went through the same adapter, hence the same connection pool.
    assert adapter.sent == ["first", "second", "third"]
    assert hooked == [200, 200, 200]
    assert len(fake_http.calls) == 3
    assert session.headers["User-Agent"] == fake_http.calls[0].request.headers["User-Agent"]


def test_without_a_session_one_is_created_once_and_reused(
    fake_http: responses.RequestsMock,
    payload: CallbackPayload,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_http.post(URL, status=200)
    created: list[requests.Session] = []
    posts: list[requests.Session] = []

    class CountingSession(requests.Session):
        def __init__(self) -> None:
            super().__init__()
            created.append(self)

        def send(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
            posts.append(self)
            return super().send(*args, **kwargs)

    monkeypatch.setattr(requests, "Session", CountingSession)

    client = CallbackClient(timeout=5)
    client.post(URL, payload, KEY)
    client.post(URL, payload, KEY)

    assert len(created) == 1
    assert posts == [created[0], created[0]]
    assert len(fake_http.calls) == 2


# --- parse_retry_after -----------------------------------------------------------------

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("7", 7.0), ("0", 0.0), (" 120 ", 120.0), ("3600", 3600.0)],
)
def test_parse_retry_after_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value, now=NOW) == expected


@pytest.mark.parametrize(
    "value",
    [
        "Wed, 01 May 2024 12:00:30 GMT",  # IMF-fixdate
        "Wednesday, 01-May-24 12:00:30 GMT",  # obsolete RFC 850 form
    ],
)
def test_parse_retry_after_http_date(value: str) -> None:
    # 30 seconds after NOW, which is 2024-05-01 12:00:00 UTC.
    assert parse_retry_after(value, now=NOW) == pytest.approx(30.0)


def test_parse_retry_after_http_date_with_an_offset() -> None:
    # 14:01:00 at +02:00 is 12:01:00 UTC: one minute after NOW.
    assert parse_retry_after("Wed, 01 May 2024 14:01:00 +0200", now=NOW) == pytest.approx(60.0)


def test_parse_retry_after_date_in_the_past_is_zero() -> None:
    assert parse_retry_after("Wed, 01 May 2024 11:00:00 GMT", now=NOW) == 0.0


def test_parse_retry_after_date_defaults_to_the_current_time() -> None:
    when = datetime.fromtimestamp(time.time() + 90, tz=UTC)
    parsed = parse_retry_after(format_datetime(when, usegmt=True))
    assert parsed is not None
    assert 85 <= parsed <= 90


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "soon", "-5", "1.5", "7s", "Wed, 32 May 2024 12:00:00 GMT", "0x10"],
)
def test_parse_retry_after_garbage_is_none(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW) is None


@pytest.mark.parametrize("value", ["²", "¹", "³"])
def test_parse_retry_after_superscript_digits_are_none(value: str) -> None:
    assert parse_retry_after(value, now=NOW) is None


@pytest.fixture
def local_time_five_hours_behind_utc() -> Iterator[None]:
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "EST5"  # POSIX form: needs no tz database
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


def test_parse_retry_after_asctime_date_is_gmt_whatever_the_local_zone(
    local_time_five_hours_behind_utc: None,
) -> None:
    # asctime form of 2024-05-01 12:00:30 GMT: 30 seconds after NOW.
    assert parse_retry_after("Wed May  1 12:00:30 2024", now=NOW) == pytest.approx(30.0)


def test_parse_retry_after_gmt_date_ignores_the_local_zone(
    local_time_five_hours_behind_utc: None,
) -> None:
    assert parse_retry_after("Wed, 01 May 2024 12:00:30 GMT", now=NOW) == pytest.approx(30.0)


# --- backoff_seconds -------------------------------------------------------------------


class FixedRandom(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize("seed", [0, 1, 7, 2024])
def test_backoff_is_between_half_and_full_step(seed: int) -> None:
    rng = random.Random(seed)
    base, cap = 2.0, 300.0
    delays = [backoff_seconds(attempt, base=base, cap=cap, rng=rng) for attempt in range(7)]

    for attempt, delay in enumerate(delays):
        step = min(cap, base * 2**attempt)
        assert 0.5 * step <= delay <= step, (attempt, delay, step)
    # Jitter halves at most, and steps double: two attempts later is always at least double.
    for earlier, later in zip(delays, delays[2:], strict=False):
        assert later >= 2 * earlier
    assert delays[-1] > delays[0] * 16


def test_backoff_with_a_seed_is_reproducible() -> None:
    first = [backoff_seconds(a, base=3, rng=random.Random(99)) for a in range(7)]
    second = [backoff_seconds(a, base=3, rng=random.Random(99)) for a in range(7)]
    assert first == second


def test_backoff_jitter_spans_half_to_full_step() -> None:
    assert backoff_seconds(3, base=2, rng=FixedRandom(0.0)) == pytest.approx(8.0)
    assert backoff_seconds(3, base=2, rng=FixedRandom(0.999999)) == pytest.approx(16.0, rel=1e-5)

    rng = random.Random(5)
    samples = [backoff_seconds(3, base=2, rng=rng) for _ in range(2000)]
    assert min(samples) < 8.0 * 1.05
    assert max(samples) > 16.0 * 0.95
    assert len(set(samples)) > 1900  # it really is jittered


def test_backoff_grows_roughly_twofold_per_attempt() -> None:
    rng = random.Random(11)
    means = [
        statistics.fmean(backoff_seconds(a, base=1, cap=10_000, rng=rng) for _ in range(2000))
        for a in range(7)
    ]
    for earlier, later in pairwise(means):
        assert 1.8 <= later / earlier <= 2.2
    # The mean of a uniform half-to-full step is three quarters of the step.
    assert means[4] == pytest.approx(0.75 * 16, rel=0.05)


def test_backoff_never_exceeds_the_cap() -> None:
    rng = random.Random(3)
    for attempt in range(30):
        delay = backoff_seconds(attempt, base=2, cap=60, rng=rng)
        assert delay <= 60
        if 2 * 2**attempt >= 60:
            assert delay >= 30
    assert backoff_seconds(0, base=10, cap=4, rng=FixedRandom(0.999999)) <= 4


def test_backoff_without_an_rng_uses_module_random() -> None:
    for attempt in range(7):
        step = min(300, 5 * 2**attempt)
        assert 0.5 * step <= backoff_seconds(attempt, base=5) <= step


def test_retry_after_larger_than_the_step_wins() -> None:
    assert backoff_seconds(0, base=2, retry_after=30, rng=FixedRandom(0.999999)) == 30
    assert backoff_seconds(2, base=2, retry_after=45.5, rng=random.Random(1)) == 45.5


def test_retry_after_is_capped() -> None:
    assert backoff_seconds(0, base=2, cap=300, retry_after=3600, rng=random.Random(1)) == 300
    assert backoff_seconds(0, base=2, cap=60, retry_after=61, rng=FixedRandom(0.0)) == 60


def test_retry_after_smaller_than_the_step_does_not_shorten_it() -> None:
    delay = backoff_seconds(5, base=2, retry_after=1, rng=FixedRandom(0.0))
    assert delay == pytest.approx(32.0)  # half of the 64 s step
    assert backoff_seconds(5, base=2, retry_after=0, rng=FixedRandom(0.0)) == pytest.approx(32.0)


def test_response_cut_off_mid_body_is_retryable(
    fake_http: responses.RequestsMock, payload: CallbackPayload
) -> None:
    fake_http.post(URL, body=requests.exceptions.ChunkedEncodingError("connection broken"))

    error = post_expecting_error(CallbackClient(timeout=5), payload)

    assert error.retryable is True


def test_unusable_url_is_permanent(payload: CallbackPayload) -> None:
    error = post_expecting_error(CallbackClient(timeout=5), payload, url="http://")

    assert error.retryable is False


class SettingsRecordingAdapter(HTTPAdapter):
    """Records the proxies and TLS verification each request was sent with."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[dict, object]] = []

    def send(self, request, **kwargs):  # type: ignore[no-untyped-def, override]
        self.sent.append((dict(kwargs.get("proxies") or {}), kwargs.get("verify")))
        return super().send(request, **kwargs)


def test_proxy_and_ca_bundle_variables_still_apply(
    fake_http: responses.RequestsMock,
    payload: CallbackPayload,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The client reads them once per process instead of on every request.
    from worker import callback

    bypassed = "https://n8n.internal.test/webhook/reply"
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.test:3128")
    monkeypatch.setenv("NO_PROXY", "n8n.internal.test")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    callback._proxies_for.cache_clear()
    fake_http.post(URL, status=200)
    fake_http.post(bypassed, status=200)
    session = requests.Session()
    adapter = SettingsRecordingAdapter()
    session.mount("https://", adapter)

    client = CallbackClient(timeout=5, session=session)
    client.post(URL, payload, "through-the-proxy")
    client.post(bypassed, payload, "direct")
    callback._proxies_for.cache_clear()

    (proxied, verify), (direct, _) = adapter.sent
    assert proxied.get("https") == "http://proxy.example.test:3128"
    assert "https" not in direct
    assert verify == "/etc/ssl/certs/ca-certificates.crt"


# --- a real n8n stand-in on loopback ---------------------------------------------------


class LoopbackN8n:
    """Answers each POST with 200 and a body, sent in `pieces` spaced `gap` seconds apart;
    counts the connections it was given."""

    def __init__(self, body: bytes, pieces: int = 1, gap: float = 0.0) -> None:
        self.body, self.pieces, self.gap = body, pieces, gap
        self.connections = 0
        self.answered = threading.Event()  # set when an answer was sent whole or left
        self.abandoned = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/webhook/reply"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._answer_all, args=(conn,), daemon=True).start()

    def _answer_all(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            while (head := self._read_head(reader)) is not None:
                reader.read(int(head.get("content-length", "0")))
                try:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.body))
                    step = -(-len(self.body) // self.pieces)
                    for start in range(0, len(self.body), step):
                        time.sleep(self.gap)
                        conn.sendall(self.body[start : start + step])
                except OSError:  # the client gave up
                    self.abandoned = True
                    return
                finally:
                    self.answered.set()

    @staticmethod
    def _read_head(reader: Any) -> dict[str, str] | None:
        if not reader.readline():
            return None
        head: dict[str, str] = {}
        while (line := reader.readline().decode().strip()) != "":
            name, _, value = line.partition(":")
            head[name.strip().lower()] = value.strip()
        return head

    def close(self) -> None:
        self._listener.close()


def test_an_answer_that_trickles_in_is_cut_short_when_the_attempt_is_out_of_time(
    payload: CallbackPayload,
) -> None:
    # Each piece arrives within the read timeout, so requests alone would wait for all 40
    # (8 s): the session's lock and a worker thread with it, while the recovery sweep
    # counts the attempt as lost after CALLBACK_TIMEOUT_SECONDS. The 200 already said the
    # reply was delivered: the body is left, not the delivery.
    n8n = LoopbackN8n(b"x" * 40, pieces=40, gap=0.2)
    try:
        status = CallbackClient(timeout=0.5).post(n8n.url, payload, KEY)
        assert n8n.answered.wait(timeout=30)
    finally:
        n8n.close()

    assert status == 200
    assert n8n.abandoned, "the client read the whole trickle"


def test_answers_read_to_their_end_keep_the_connection_for_the_next_post(
    payload: CallbackPayload,
) -> None:
    n8n = LoopbackN8n(b'{"message":"Workflow was started"}', pieces=2, gap=0.01)
    client = CallbackClient(timeout=5)
    try:
        statuses = [client.post(n8n.url, payload, f"{KEY}-{n}") for n in range(5)]
    finally:
        n8n.close()

    assert statuses == [200] * 5
    assert n8n.connections == 1
