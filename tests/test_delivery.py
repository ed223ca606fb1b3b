"""The delivery policy: one attempt now, a scheduled later attempt on a retryable failure,
the dead letters when attempts or age run out.

The outbox and the dead letters live in the real test Redis; HTTP is faked with
`responses`; `schedule` is a recorder standing in for the Celery countdown task, so a chain
of attempts is driven by calling `attempt_pending` again with what it scheduled; `clock` is
a settable fake, so ages and next-attempt times are exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import redis
import requests
import responses

from common.keys import dead_letters, session_keys
from common.messages import CallbackPayload, OutboxEntry
from common.settings import Settings
from worker.callback import CallbackClient
from worker.delivery import Delivery
from worker.outbox import DeadLetters, Outbox

URL = "https://n8n.example.test/webhook/reply"
SESSION = "5511999990000"
KEY = "reply-5511999990000-wamid.HBgM-0001"
NOW = 1_714_564_800.0  # 2024-05-01 12:00:00 UTC, far from the wall clock on purpose
BASE = 2
CAP = 120
MAX_RETRIES = 3
MAX_AGE = 3600


@dataclass
class Scheduled:
    session_id: str
    key: str
    delay: float


class Recorder:
    """Stands in for deliver_reply.apply_async(countdown=delay)."""

    def __init__(self) -> None:
        self.calls: list[Scheduled] = []

    def __call__(self, session_id: str, key: str, delay: float) -> None:
        self.calls.append(Scheduled(session_id, key, delay))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings(
        callback_max_retries=MAX_RETRIES,
        callback_retry_backoff_seconds=BASE,
        callback_max_backoff_seconds=CAP,
        callback_max_age_seconds=MAX_AGE,
    )


@pytest.fixture
def fake_http() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def schedule() -> Recorder:
    return Recorder()


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


def build_delivery(
    settings: Settings, client: redis.Redis, schedule: Recorder, clock: Clock
) -> Delivery:
    return Delivery(
        client=CallbackClient(timeout=5),
        outbox=Outbox(client),
        dead_letters=DeadLetters(client, settings.key_prefix),
        settings=settings,
        schedule=schedule,
        clock=clock,
    )


@pytest.fixture
def delivery(
    settings: Settings, redis_client: redis.Redis, schedule: Recorder, clock: Clock
) -> Delivery:
    return build_delivery(settings, redis_client, schedule, clock)


def make_payload() -> CallbackPayload:
    return CallbackPayload(
        to=SESSION,
        session_id=SESSION,
        reply="¡Claro! Te lo envío mañana 🚚",
        in_reply_to=["wamid.HBgM-0001"],
        conversation_id="conv-42",
        metadata={"channel": "whatsapp"},
        model="tiny-test-model",
        generated_at="2024-05-01T12:00:00+00:00",
        latency_ms=87,
    )


def make_entry(**overrides: object) -> OutboxEntry:
    values: dict[str, object] = {
        "session_id": SESSION,
        "idempotency_key": KEY,
        "url": URL,
        "payload": make_payload(),
        "created_at": NOW - 5,
        "next_attempt_at": NOW - 5,
    }
    values.update(overrides)
    return OutboxEntry(**values)


def put(client: redis.Redis, settings: Settings, entry: OutboxEntry) -> None:
    keys = session_keys(settings.key_prefix, entry.session_id)
    client.hset(keys.outbox, entry.idempotency_key, entry.model_dump_json())


def stored(client: redis.Redis, settings: Settings, key: str = KEY) -> OutboxEntry | None:
    raw = client.hget(session_keys(settings.key_prefix, SESSION).outbox, key)
    return OutboxEntry.model_validate_json(raw) if raw else None


def dead(client: redis.Redis, settings: Settings) -> dict[str, OutboxEntry]:
    raw = client.hgetall(dead_letters(settings.key_prefix))
    return {k: OutboxEntry.model_validate_json(v) for k, v in raw.items()}


def step_bounds(attempts_before: int) -> tuple[float, float]:
    """Jittered exponential step for the attempt after `attempts_before` ones."""
    step = min(CAP, BASE * 2**attempts_before)
    return 0.5 * step, step


# --- success ---------------------------------------------------------------------------


def test_success_posts_once_removes_the_entry_and_schedules_nothing(
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
    schedule: Recorder,
) -> None:
    fake_http.post(URL, status=200)
    entry = make_entry()
    put(redis_client, settings, entry)

    assert delivery.attempt(entry) is True

    assert len(fake_http.calls) == 1
    request = fake_http.calls[0].request
    assert request.headers["Idempotency-Key"] == KEY
    assert json.loads(request.body) == entry.payload.model_dump()
    assert stored(redis_client, settings) is None
    assert not redis_client.exists(session_keys(settings.key_prefix, SESSION).outbox)
    assert schedule.calls == []
    assert dead(redis_client, settings) == {}


def test_success_leaves_other_replies_of_the_session_alone(
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
) -> None:
    fake_http.post(URL, status=204)
    entry = make_entry()
    other = make_entry(idempotency_key="reply-other")
    put(redis_client, settings, entry)
    put(redis_client, settings, other)

    assert delivery.attempt(entry) is True

    assert stored(redis_client, settings) is None
    assert stored(redis_client, settings, "reply-other") == other


# --- retryable failures ----------------------------------------------------------------


@pytest.mark.parametrize("attempts_before", [0, 1, 2])
def test_retryable_failure_updates_the_entry_and_schedules_the_next_attempt(
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
    schedule: Recorder,
    attempts_before: int,
) -> None:
    fake_http.post(URL, status=503)
    entry = make_entry(attempts=attempts_before)
    put(redis_client, settings, entry)

    assert delivery.attempt(entry) is False

    assert len(fake_http.calls) == 1
    assert len(schedule.calls) == 1
    call = schedule.calls[0]
    assert (call.session_id, call.key) == (SESSION, KEY)
    low, high = step_bounds(attempts_before)
    assert low <= call.delay <= high

    updated = stored(redis_client, settings)
    assert updated is not None
    assert updated.attempts == attempts_before + 1
    assert updated.last_error is not None
    assert "503" in updated.last_error
    assert updated.next_attempt_at == pytest.approx(NOW + call.delay, abs=1e-6)
    assert updated.failed_at is None
    # What is sent and its identity do not change between attempts.
    assert updated.payload == entry.payload
    assert updated.url == entry.url
    assert updated.created_at == entry.created_at
    assert dead(redis_client, settings) == {}


@pytest.mark.parametrize(
    "exc",
    [requests.ConnectionError("refused"), requests.Timeout("timed out")],
    ids=["ConnectionError", "Timeout"],
)
def test_network_error_is_retried(
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
    schedule: Recorder,
    exc: Exception,
) -> None:
    fake_http.post(URL, body=exc)
    entry = make_entry()
    put(redis_client, settings, entry)

    assert delivery.attempt(entry) is False

    assert [(c.session_id, c.key) for c in schedule.calls] == [(SESSION, KEY)]
    updated = stored(redis_client, settings)
    assert updated is not None
    assert updated.attempts == 1
    assert updated.last_error
    assert dead(redis_client, settings) == {}


@pytest.mark.parametrize(("status", "retry_after"), [(429, 7), (503, 30), (503, 120)])
def test_retry_after_is_honoured(
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
    schedule: Recorder,
    status: int,
    retry_after: int,
) -> None:
    fake_http.post(URL, status=status, headers={"Retry-After": str(retry_after)})
    entry = make_entry()
    put(redis_client, settings, entry)

    assert delivery.attempt(entry) is False

    assert len(schedule.calls) == 1
    delay = schedule.calls[0].delay
    # The first step is at most BASE seconds, so the server's wait decides.
    assert delay >= retry_after
    assert delay == pytest.approx(retry_after)
    updated = stored(redis_client, settings)
    assert updated is not None
    assert updated.next_attempt_at == pytest.approx(NOW + delay, abs=1e-6)


def test_retry_after_beyond_the_cap_is_capped(
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
    schedule: Recorder,
) -> None:
    fake_http.post(URL, status=503, headers={"Retry-After": "86400"})
    entry = make_entry()
    put(redis_client, settings, entry)

    assert delivery.attempt(entry) is False

    assert len(schedule.calls) == 1
    assert schedule.calls[0].delay == pytest.approx(settings.callback_max_backoff_seconds)
    updated = stored(redis_client, settings)
    assert updated is not None
    assert updated.next_attempt_at == pytest.approx(
        NOW + settings.callback_max_backoff_seconds, abs=1e-6
    )


# --- dead letters ----------------------------------------------------------------------


@pytest.mark.parametrize("max_retries", [0, 1, 3])
def test_retries_exhausted_moves_the_reply_to_the_dead_letters(
    make_settings,
    redis_client: redis.Redis,
    fake_http: responses.RequestsMock,
    schedule: Recorder,
    clock: Clock,
    max_retries: int,
) -> None:
    settings = make_settings(callback_max_retries=max_retries)
    delivery = build_delivery(settings, redis_client, schedule, clock)
    fake_http.post(URL, status=503)
    # 1 + max_retries attempts in all; this is the last of them.
    entry = make_entry(attempts=max_retries)
    put(redis_client, settings, entry)

    assert delivery.attempt(entry) is False

    assert len(fake_http.calls) == 1
    assert schedule.calls == []
    assert stored(redis_client, settings) is None
    letters = dead(redis_client, settings)
    assert list(letters) == [KEY]
    letter = letters[KEY]
    assert letter.attempts == max_retries + 1
    assert letter.failed_at == pytest.approx(NOW, abs=1e-6)
    assert letter.last_error is not None
    assert "503" in letter.last_error
    assert letter.payload == entry.payload
    assert letter.url == URL
    assert letter.session_id == SESSION
    # The DeadLetters API sees the same entry.
    assert DeadLetters(redis_client, settings.key_prefix).get(KEY) == letter


def test_the_attempt_before_the_last_is_still_retried(
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
    schedule: Recorder,
) -> None:
    fake_http.post(URL, status=503)
    entry = make_entry(attempts=MAX_RETRIES - 1)
    put(redis_client, settings, entry)

    assert delivery.attempt(entry) is False

    assert len(schedule.calls) == 1
    assert dead(redis_client, settings) == {}
    updated = stored(redis_client, settings)
    assert updated is not None
    assert updated.attempts == MAX_RETRIES


def test_too_old_a_reply_is_dead_on_a_retryable_error(
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
    schedule: Recorder,
    clock: Clock,
) -> None:
    fake_http.post(URL, status=503)
    entry = make_entry(created_at=NOW, next_attempt_at=NOW)
    put(redis_client, settings, entry)
    clock.now = NOW + MAX_AGE + 60  # far past its maximum age, retries still left

    assert delivery.attempt(entry) is False

    assert schedule.calls == []
    assert stored(redis_client, settings) is None
    letter = dead(redis_client, settings)[KEY]
    assert letter.attempts == 1
    assert letter.failed_at == pytest.approx(NOW + MAX_AGE + 60, abs=1e-6)
    assert letter.last_error is not None


def test_age_is_measured_with_the_injected_clock(
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
    schedule: Recorder,
    clock: Clock,
) -> None:
    # Created long before the wall clock's now, but young by the delivery's clock.
    fake_http.post(URL, status=503)
    entry = make_entry(created_at=NOW, next_attempt_at=NOW)
    put(redis_client, settings, entry)
    clock.now = NOW + MAX_AGE - 60

    assert delivery.attempt(entry) is False

    assert len(schedule.calls) == 1
    assert dead(redis_client, settings) == {}


@pytest.mark.parametrize("status", [400, 401, 404, 410, 422, 302])
def test_permanent_failure_is_dead_at_once(
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
    schedule: Recorder,
    status: int,
) -> None:
    fake_http.post(URL, status=status)
    entry = make_entry()
    put(redis_client, settings, entry)

    assert delivery.attempt(entry) is False

    assert len(fake_http.calls) == 1
    assert schedule.calls == []
    assert stored(redis_client, settings) is None
    letter = dead(redis_client, settings)[KEY]
    assert letter.attempts == 1
    assert letter.failed_at == pytest.approx(NOW, abs=1e-6)
    assert letter.last_error is not None
    assert str(status) in letter.last_error


# --- scheduled attempts ----------------------------------------------------------------


def test_attempt_pending_without_the_entry_does_nothing(
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
    schedule: Recorder,
) -> None:
    route = fake_http.post(URL, status=200)

    assert delivery.attempt_pending(SESSION, KEY) is False

    assert route.call_count == 0
    assert len(fake_http.calls) == 0
    assert schedule.calls == []
    assert dead(redis_client, settings) == {}
    assert stored(redis_client, settings) is None


def test_attempt_pending_delivers_what_is_stored(
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
) -> None:
    fake_http.post(URL, status=200)
    entry = make_entry(attempts=2, last_error="callback answered 503")
    put(redis_client, settings, entry)

    assert delivery.attempt_pending(SESSION, KEY) is True

    assert len(fake_http.calls) == 1
    assert fake_http.calls[0].request.headers["Idempotency-Key"] == KEY
    assert stored(redis_client, settings) is None


def test_a_chain_of_attempts_keeps_one_idempotency_key(
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
    schedule: Recorder,
    clock: Clock,
) -> None:
    # Registered responses for one URL are served in order.
    fake_http.post(URL, status=503)
    fake_http.post(URL, status=503)
    fake_http.post(URL, status=200)
    entry = make_entry()
    put(redis_client, settings, entry)

    results = [delivery.attempt(entry)]
    attempts_seen = []
    while len(schedule.calls) == len(results) and len(results) < 10:
        call = schedule.calls[-1]
        current = stored(redis_client, settings, call.key)
        assert current is not None
        attempts_seen.append(current.attempts)
        clock.now += call.delay  # the countdown elapses
        results.append(delivery.attempt_pending(call.session_id, call.key))

    assert results == [False, False, True]
    assert attempts_seen == [1, 2]
    assert len(fake_http.calls) == 3
    assert [c.request.headers["Idempotency-Key"] for c in fake_http.calls] == [KEY] * 3
    assert [json.loads(c.request.body) for c in fake_http.calls] == [entry.payload.model_dump()] * 3
    assert [(c.session_id, c.key) for c in schedule.calls] == [(SESSION, KEY)] * 2
    first, second = (c.delay for c in schedule.calls)
    assert step_bounds(0)[0] <= first <= step_bounds(0)[1]
    assert step_bounds(1)[0] <= second <= step_bounds(1)[1]
    assert stored(redis_client, settings) is None
    assert not redis_client.exists(session_keys(settings.key_prefix, SESSION).outbox)
    assert dead(redis_client, settings) == {}


def test_a_never_answering_callback_ends_in_the_dead_letters(
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
    schedule: Recorder,
    clock: Clock,
) -> None:
    fake_http.post(URL, status=503)
    entry = make_entry()
    put(redis_client, settings, entry)

    results = [delivery.attempt(entry)]
    while len(schedule.calls) == len(results) and len(results) < 20:
        call = schedule.calls[-1]
        clock.now += call.delay
        results.append(delivery.attempt_pending(call.session_id, call.key))

    assert results == [False] * (1 + MAX_RETRIES)
    assert len(fake_http.calls) == 1 + MAX_RETRIES
    assert stored(redis_client, settings) is None
    letter = dead(redis_client, settings)[KEY]
    assert letter.attempts == 1 + MAX_RETRIES
    assert letter.failed_at == pytest.approx(clock.now, abs=1e-6)
    # A later (say, duplicate) scheduled attempt finds nothing to do.
    assert delivery.attempt_pending(SESSION, KEY) is False
    assert len(fake_http.calls) == 1 + MAX_RETRIES


# --- races with another delivery -------------------------------------------------------


def delivered_meanwhile(client: redis.Redis, settings: Settings, status: int) -> Callable:
    """A callback that removes the entry (as another worker's success would) and fails."""
    outbox = session_keys(settings.key_prefix, SESSION).outbox

    def respond(request):  # type: ignore[no-untyped-def]
        client.hdel(outbox, KEY)
        return (status, {}, "")

    return respond


def test_retryable_failure_after_someone_else_delivered_is_not_resurrected(
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
    schedule: Recorder,
) -> None:
    fake_http.add_callback(
        responses.POST, URL, callback=delivered_meanwhile(redis_client, settings, 503)
    )
    entry = make_entry()
    put(redis_client, settings, entry)

    assert delivery.attempt(entry) is False

    assert len(fake_http.calls) == 1
    assert schedule.calls == []
    assert stored(redis_client, settings) is None
    assert not redis_client.exists(session_keys(settings.key_prefix, SESSION).outbox)
    assert dead(redis_client, settings) == {}


def test_retryable_failure_of_an_entry_not_in_the_outbox_is_not_scheduled(
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
    schedule: Recorder,
) -> None:
    fake_http.post(URL, status=503)

    keys = session_keys(settings.key_prefix, SESSION)
    assert Outbox(redis_client).update(keys, make_entry()) is False

    assert delivery.attempt(make_entry()) is False

    assert schedule.calls == []
    assert stored(redis_client, settings) is None
    assert dead(redis_client, settings) == {}


@pytest.mark.parametrize("case", ["permanent", "exhausted"])
def test_final_failure_after_someone_else_delivered_is_not_a_dead_letter(
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
    schedule: Recorder,
    case: str,
) -> None:
    fail_finally_while(delivered_meanwhile, case, delivery, fake_http, redis_client, settings)

    assert schedule.calls == []
    assert stored(redis_client, settings) is None
    assert dead(redis_client, settings) == {}


def fail_finally_while(
    meanwhile: Callable[[redis.Redis, Settings, int], Callable],
    case: str,
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
) -> None:
    """A last attempt (permanent 4xx, or retries used up) during which `meanwhile` runs."""
    status, attempts = (404, 0) if case == "permanent" else (503, MAX_RETRIES)
    fake_http.add_callback(responses.POST, URL, callback=meanwhile(redis_client, settings, status))
    entry = make_entry(attempts=attempts)
    put(redis_client, settings, entry)

    assert delivery.attempt(entry) is False


def dead_lettered_meanwhile(client: redis.Redis, settings: Settings, status: int) -> Callable:
    """A callback during which someone else (the sweep expiring the reply, or another
    attempt giving up) moves the entry to the dead letters; then it fails too."""
    outbox = session_keys(settings.key_prefix, SESSION).outbox
    theirs = make_entry(attempts=2, last_error="expired", failed_at=NOW - 1)

    def respond(request):  # type: ignore[no-untyped-def]
        client.hset(dead_letters(settings.key_prefix), KEY, theirs.model_dump_json())
        client.hdel(outbox, KEY)
        return (status, {}, "")

    return respond


@pytest.mark.parametrize("case", ["permanent", "exhausted"])
def test_final_failure_after_someone_else_dead_lettered_it_keeps_a_dead_letter(
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
    schedule: Recorder,
    case: str,
) -> None:
    # Both gave up on the same reply at once: one letter must remain, never none.
    fail_finally_while(dead_lettered_meanwhile, case, delivery, fake_http, redis_client, settings)

    assert schedule.calls == []
    assert stored(redis_client, settings) is None
    assert list(dead(redis_client, settings)) == [KEY]


def test_a_dead_letter_added_first_is_kept_when_another_replaced_it(
    delivery: Delivery,
    fake_http: responses.RequestsMock,
    redis_client: redis.Redis,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # This attempt adds the first letter; before it removes the outbox entry, another one
    # giving up replaces the letter and removes the entry. Taking back "its" letter now
    # would leave none.
    fake_http.post(URL, status=404)
    entry = make_entry()
    put(redis_client, settings, entry)
    keys = session_keys(settings.key_prefix, SESSION)
    other = make_entry(attempts=3, last_error="callback answered 500", failed_at=NOW - 1)
    add = delivery.dead_letters.add

    def add_then_other_gives_up(letter: OutboxEntry) -> bool:
        first = add(letter)
        redis_client.hset(dead_letters(settings.key_prefix), KEY, other.model_dump_json())
        redis_client.hdel(keys.outbox, KEY)
        return first

    monkeypatch.setattr(delivery.dead_letters, "add", add_then_other_gives_up)

    assert delivery.attempt(entry) is False

    assert stored(redis_client, settings) is None
    assert dead(redis_client, settings) == {KEY: other}
