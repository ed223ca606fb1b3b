"""The recovery sweep: what it finds stranded in a real Redis and what it queues again.

`requeue` and `schedule_delivery` are recorders standing in for the Celery tasks; `now` is
a fixed time, so "older than the grace period" is exact.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pydantic
import pytest
import redis

from common.keys import dead_letters, session_keys, session_of
from common.messages import CallbackPayload, OutboxEntry, PendingMessage
from common.settings import Settings
from worker.recovery import SweepReport, find_stranded, sweep

NOW = 1_714_564_800.0  # 2024-05-01 12:00:00 UTC
GRACE = 30
CALLBACK_TIMEOUT = 10.0
OVERDUE = GRACE + CALLBACK_TIMEOUT
SESSION = "5511999990000"
URL = "https://n8n.example.test/webhook/reply"


@dataclass
class Recorder:
    calls: list[tuple]

    def __call__(self, *args: object) -> None:
        self.calls.append(args)


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings(recovery_grace_seconds=GRACE, callback_timeout_seconds=CALLBACK_TIMEOUT)


@pytest.fixture
def requeue() -> Recorder:
    return Recorder([])


@pytest.fixture
def schedule() -> Recorder:
    return Recorder([])


def run_sweep(
    client: redis.Redis,
    settings: Settings,
    requeue: Recorder,
    schedule: Recorder,
    now: float = NOW,
) -> SweepReport:
    return sweep(client, settings, requeue, schedule, now=now)


def pending(session: str = SESSION, received_at: float = NOW, n: int = 1) -> PendingMessage:
    return PendingMessage(
        message_id=f"wamid.{session}-{n}",
        session_id=session,
        sender=session,
        text=f"hola {n}",
        received_at=received_at,
    )


def outbox_entry(
    session: str = SESSION, key: str = "reply-1", next_attempt_at: float = NOW
) -> OutboxEntry:
    return OutboxEntry(
        session_id=session,
        idempotency_key=key,
        url=URL,
        payload=CallbackPayload(
            to=session,
            session_id=session,
            reply="¡Hola!",
            in_reply_to=[f"wamid.{session}-1"],
            conversation_id="conv-1",
            metadata={},
            model="tiny-test-model",
            generated_at="2024-05-01T12:00:00+00:00",
            latency_ms=5,
        ),
        created_at=next_attempt_at - 1,
        next_attempt_at=next_attempt_at,
        attempts=1,
        last_error="callback answered 503",
    )


def add_processing(client: redis.Redis, prefix: str, session: str, received_at: float) -> None:
    keys = session_keys(prefix, session)
    client.rpush(keys.processing, pending(session, received_at).model_dump_json())


def add_inbox(client: redis.Redis, prefix: str, session: str, *received_at: float) -> None:
    keys = session_keys(prefix, session)
    for n, at in enumerate(received_at, start=1):
        client.rpush(keys.inbox, pending(session, at, n).model_dump_json())


def add_outbox(client: redis.Redis, prefix: str, entry: OutboxEntry) -> None:
    keys = session_keys(prefix, entry.session_id)
    client.hset(keys.outbox, entry.idempotency_key, entry.model_dump_json())


def lock(client: redis.Redis, prefix: str, session: str) -> None:
    client.set(session_keys(prefix, session).lock, "some-worker-token", px=30_000)


def stored(client: redis.Redis, prefix: str, session: str, key: str) -> OutboxEntry:
    raw = client.hget(session_keys(prefix, session).outbox, key)
    assert raw is not None
    return OutboxEntry.model_validate_json(raw)


# --- processing lists ------------------------------------------------------------------


def test_processing_without_a_lock_is_requeued(
    redis_client: redis.Redis, settings: Settings, requeue: Recorder, schedule: Recorder
) -> None:
    # Claimed a moment ago: a claim with no holder is a dead worker, whatever its age.
    add_processing(redis_client, settings.key_prefix, SESSION, received_at=NOW - 1)

    report = run_sweep(redis_client, settings, requeue, schedule)

    assert report.sessions == {SESSION}
    assert requeue.calls == [(SESSION, 0)]
    assert schedule.calls == []


def test_processing_with_a_lock_is_left_to_its_holder(
    redis_client: redis.Redis, settings: Settings, requeue: Recorder, schedule: Recorder
) -> None:
    add_processing(redis_client, settings.key_prefix, SESSION, received_at=NOW - 3600)
    lock(redis_client, settings.key_prefix, SESSION)

    report = run_sweep(redis_client, settings, requeue, schedule)

    assert report.sessions == set()
    assert requeue.calls == []


def test_a_lock_of_another_session_does_not_protect(
    redis_client: redis.Redis, settings: Settings, requeue: Recorder, schedule: Recorder
) -> None:
    add_processing(redis_client, settings.key_prefix, SESSION, received_at=NOW)
    lock(redis_client, settings.key_prefix, "someone-else")

    run_sweep(redis_client, settings, requeue, schedule)

    assert requeue.calls == [(SESSION, 0)]


# --- inboxes ---------------------------------------------------------------------------


def test_an_old_inbox_without_a_lock_is_requeued(
    redis_client: redis.Redis, settings: Settings, requeue: Recorder, schedule: Recorder
) -> None:
    add_inbox(redis_client, settings.key_prefix, SESSION, NOW - GRACE - 1)

    report = run_sweep(redis_client, settings, requeue, schedule)

    assert report.sessions == {SESSION}
    assert requeue.calls == [(SESSION, 0)]


def test_a_fresh_inbox_is_left_to_its_task(
    redis_client: redis.Redis, settings: Settings, requeue: Recorder, schedule: Recorder
) -> None:
    add_inbox(redis_client, settings.key_prefix, SESSION, NOW - GRACE + 1)

    report = run_sweep(redis_client, settings, requeue, schedule)

    assert report.sessions == set()
    assert requeue.calls == []


def test_an_old_inbox_with_a_lock_is_left_to_its_holder(
    redis_client: redis.Redis, settings: Settings, requeue: Recorder, schedule: Recorder
) -> None:
    add_inbox(redis_client, settings.key_prefix, SESSION, NOW - 10 * GRACE)
    lock(redis_client, settings.key_prefix, SESSION)

    run_sweep(redis_client, settings, requeue, schedule)

    assert requeue.calls == []


def test_the_oldest_message_of_an_inbox_decides(
    redis_client: redis.Redis, settings: Settings, requeue: Recorder, schedule: Recorder
) -> None:
    # An old message at the head, a fresh one behind it: the inbox is overdue.
    add_inbox(redis_client, settings.key_prefix, SESSION, NOW - GRACE - 5, NOW - 1)

    run_sweep(redis_client, settings, requeue, schedule)

    assert requeue.calls == [(SESSION, 0)]


def test_a_session_stranded_twice_is_requeued_once(
    redis_client: redis.Redis, settings: Settings, requeue: Recorder, schedule: Recorder
) -> None:
    add_processing(redis_client, settings.key_prefix, SESSION, received_at=NOW - 100)
    add_inbox(redis_client, settings.key_prefix, SESSION, NOW - 100)

    run_sweep(redis_client, settings, requeue, schedule)

    assert requeue.calls == [(SESSION, 0)]


def test_several_sessions_are_each_requeued(
    redis_client: redis.Redis, settings: Settings, requeue: Recorder, schedule: Recorder
) -> None:
    prefix = settings.key_prefix
    add_processing(redis_client, prefix, "a-dead-claim", received_at=NOW)
    add_inbox(redis_client, prefix, "b-old-inbox", NOW - GRACE - 1)
    add_inbox(redis_client, prefix, "c-fresh-inbox", NOW)
    add_processing(redis_client, prefix, "d-locked", received_at=NOW)
    lock(redis_client, prefix, "d-locked")

    report = run_sweep(redis_client, settings, requeue, schedule)

    assert report.sessions == {"a-dead-claim", "b-old-inbox"}
    assert sorted(requeue.calls) == [("a-dead-claim", 0), ("b-old-inbox", 0)]


def test_nothing_stranded_means_nothing_queued(
    redis_client: redis.Redis, settings: Settings, requeue: Recorder, schedule: Recorder
) -> None:
    report = run_sweep(redis_client, settings, requeue, schedule)

    assert report.sessions == set()
    assert report.deliveries == []
    assert requeue.calls == []
    assert schedule.calls == []


# --- outboxes --------------------------------------------------------------------------


def test_an_overdue_delivery_is_scheduled(
    redis_client: redis.Redis, settings: Settings, requeue: Recorder, schedule: Recorder
) -> None:
    entry = outbox_entry(next_attempt_at=NOW - OVERDUE - 1)
    add_outbox(redis_client, settings.key_prefix, entry)

    report = run_sweep(redis_client, settings, requeue, schedule)

    assert schedule.calls == [(SESSION, "reply-1", 0)]
    assert [e.idempotency_key for e in report.deliveries] == ["reply-1"]
    assert requeue.calls == []
    # The sweep marks it as just scheduled and changes nothing else.
    after = stored(redis_client, settings.key_prefix, SESSION, "reply-1")
    assert after.next_attempt_at == pytest.approx(NOW, abs=1e-6)
    assert after.model_copy(update={"next_attempt_at": entry.next_attempt_at}) == entry


@pytest.mark.parametrize(
    "next_attempt_at",
    [NOW - OVERDUE + 1, NOW - GRACE - 1, NOW, NOW + 300],
    ids=["within-grace-plus-timeout", "past-grace-only", "now", "future"],
)
def test_a_delivery_not_yet_overdue_is_left_alone(
    redis_client: redis.Redis,
    settings: Settings,
    requeue: Recorder,
    schedule: Recorder,
    next_attempt_at: float,
) -> None:
    entry = outbox_entry(next_attempt_at=next_attempt_at)
    add_outbox(redis_client, settings.key_prefix, entry)

    report = run_sweep(redis_client, settings, requeue, schedule)

    assert schedule.calls == []
    assert report.deliveries == []
    assert stored(redis_client, settings.key_prefix, SESSION, "reply-1") == entry


def test_only_the_overdue_replies_of_an_outbox_are_scheduled(
    redis_client: redis.Redis, settings: Settings, requeue: Recorder, schedule: Recorder
) -> None:
    prefix = settings.key_prefix
    add_outbox(redis_client, prefix, outbox_entry(key="old", next_attempt_at=NOW - 1000))
    add_outbox(redis_client, prefix, outbox_entry(key="new", next_attempt_at=NOW - 1))
    add_outbox(redis_client, prefix, outbox_entry("other", key="old2", next_attempt_at=NOW - 500))

    run_sweep(redis_client, settings, requeue, schedule)

    assert sorted(schedule.calls) == sorted([(SESSION, "old", 0), ("other", "old2", 0)])


def test_a_second_sweep_does_not_schedule_the_same_delivery_again(
    redis_client: redis.Redis, settings: Settings, requeue: Recorder, schedule: Recorder
) -> None:
    add_outbox(redis_client, settings.key_prefix, outbox_entry(next_attempt_at=NOW - 600))

    run_sweep(redis_client, settings, requeue, schedule, now=NOW)
    run_sweep(redis_client, settings, requeue, schedule, now=NOW)
    run_sweep(redis_client, settings, requeue, schedule, now=NOW + OVERDUE - 1)

    assert schedule.calls == [(SESSION, "reply-1", 0)]


def test_a_delivery_still_stuck_after_another_grace_period_is_scheduled_again(
    redis_client: redis.Redis, settings: Settings, requeue: Recorder, schedule: Recorder
) -> None:
    add_outbox(redis_client, settings.key_prefix, outbox_entry(next_attempt_at=NOW - 600))

    run_sweep(redis_client, settings, requeue, schedule, now=NOW)
    run_sweep(redis_client, settings, requeue, schedule, now=NOW + OVERDUE + 1)

    assert schedule.calls == [(SESSION, "reply-1", 0), (SESSION, "reply-1", 0)]


def test_find_stranded_changes_nothing(redis_client: redis.Redis, settings: Settings) -> None:
    entry = outbox_entry(next_attempt_at=NOW - 600)
    add_outbox(redis_client, settings.key_prefix, entry)
    add_processing(redis_client, settings.key_prefix, "claimed", received_at=NOW)

    first = find_stranded(redis_client, settings, NOW)
    second = find_stranded(redis_client, settings, NOW)

    assert first.sessions == second.sessions == {"claimed"}
    assert first.deliveries == second.deliveries == [entry]
    assert stored(redis_client, settings.key_prefix, SESSION, "reply-1") == entry


# --- key names -------------------------------------------------------------------------

ODD_SESSIONS = [
    "+5511999990000",
    "whatsapp:+5511999990000",
    "+44:7700:900123",
    "a:b:c:processing",
    "grp:inbox",
    "x*y?z[1]",
]


@pytest.mark.parametrize("session", ODD_SESSIONS)
def test_session_of_inverts_session_keys(session: str) -> None:
    for prefix in ("wa", "test-abc", "wa:prod"):
        keys = session_keys(prefix, session)
        for key in (keys.inbox, keys.processing, keys.outbox, keys.lock):
            assert session_of(prefix, key) == session


@pytest.mark.parametrize("session", ODD_SESSIONS)
def test_sessions_with_odd_characters_are_found(
    redis_client: redis.Redis,
    settings: Settings,
    requeue: Recorder,
    schedule: Recorder,
    session: str,
) -> None:
    add_processing(redis_client, settings.key_prefix, session, received_at=NOW)
    add_outbox(redis_client, settings.key_prefix, outbox_entry(session, next_attempt_at=NOW - 600))

    run_sweep(redis_client, settings, requeue, schedule)

    assert requeue.calls == [(session, 0)]
    assert schedule.calls == [(session, "reply-1", 0)]
    # The bookkeeping went to that session's outbox, not a mis-parsed one.
    assert stored(redis_client, settings.key_prefix, session, "reply-1").next_attempt_at == NOW


def test_odd_sessions_are_told_apart(
    redis_client: redis.Redis, settings: Settings, requeue: Recorder, schedule: Recorder
) -> None:
    prefix = settings.key_prefix
    for session in ODD_SESSIONS:
        add_processing(redis_client, prefix, session, received_at=NOW)
    lock(redis_client, prefix, "+44:7700:900123")

    run_sweep(redis_client, settings, requeue, schedule)

    expected = sorted((s, 0) for s in ODD_SESSIONS if s != "+44:7700:900123")
    assert sorted(requeue.calls) == expected


@pytest.fixture
def foreign_prefixes(settings: Settings, redis_client: redis.Redis) -> Iterator[list[str]]:
    """Prefixes of other deployments, some sharing the beginning of ours; cleaned after."""
    prefixes = [
        f"{settings.key_prefix}2",
        f"{settings.key_prefix}-staging",
        f"x{settings.key_prefix}",
        f"other-{uuid.uuid4().hex[:10]}",
    ]
    yield prefixes
    for prefix in prefixes:
        keys = list(redis_client.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            redis_client.delete(*keys)


def test_keys_of_another_prefix_are_ignored(
    redis_client: redis.Redis,
    settings: Settings,
    requeue: Recorder,
    schedule: Recorder,
    foreign_prefixes: list[str],
) -> None:
    for prefix in foreign_prefixes:
        add_processing(redis_client, prefix, SESSION, received_at=NOW)
        add_inbox(redis_client, prefix, SESSION, NOW - 10 * GRACE)
        add_outbox(redis_client, prefix, outbox_entry(next_attempt_at=NOW - 600))
    add_inbox(redis_client, settings.key_prefix, "ours", NOW - 10 * GRACE)

    report = run_sweep(redis_client, settings, requeue, schedule)

    assert requeue.calls == [("ours", 0)]
    assert schedule.calls == []
    assert report.deliveries == []
    # Their outbox entries were not touched either.
    for prefix in foreign_prefixes:
        assert stored(redis_client, prefix, SESSION, "reply-1").next_attempt_at == NOW - 600


@pytest.mark.parametrize("prefix", ["wa[1]", "wa?", "wa*", "wa:{x}", "wa b", ""])
def test_a_prefix_that_could_match_other_keys_is_refused(prefix: str) -> None:
    # The prefix goes into SCAN patterns unescaped, so only plain characters are allowed.
    with pytest.raises(pydantic.ValidationError):
        Settings(_env_file=None, key_prefix=prefix)


def test_unreadable_entries_are_skipped_and_the_rest_is_swept(
    redis_client: redis.Redis,
    settings: Settings,
    requeue: Recorder,
    schedule: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Left by another version of the code, or by hand: one value must not stop the sweep
    # of every other session at every tick.
    prefix = settings.key_prefix
    redis_client.rpush(session_keys(prefix, "garbled").inbox, "{not json")
    redis_client.hset(session_keys(prefix, "garbled").outbox, "reply-x", '{"half": ')
    add_processing(redis_client, prefix, SESSION, received_at=NOW - 10 * GRACE)

    run_sweep(redis_client, settings, requeue, schedule)

    assert requeue.calls == [(SESSION, 0)]
    assert schedule.calls == []
    assert caplog.text.count("cannot be read; skipped") == 2


def test_a_timer_step_that_fails_logs_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    # Its first tick runs while the worker starts: an error there would stop the worker.
    import kombu.exceptions

    from worker.bootsteps import RecoverySweep

    step = RecoverySweep.__new__(RecoverySweep)
    failures = [kombu.exceptions.OperationalError("broker down"), ValueError("bad entry")]

    def tick() -> None:
        raise failures.pop(0)

    step.tick = tick  # type: ignore[method-assign]
    step._safe_tick()
    step._safe_tick()

    assert failures == []
    assert caplog.text.count("RecoverySweep failed; the next tick tries again") == 2


# --- one requeue per stranded state ----------------------------------------------------


def test_a_stranded_session_is_requeued_once_while_its_task_waits(
    redis_client: redis.Redis, settings: Settings, requeue: Recorder, schedule: Recorder
) -> None:
    # The only worker is still loading its model: the queued task is not taken yet, so
    # the session looks stranded at every sweep. One task is enough.
    add_processing(redis_client, settings.key_prefix, SESSION, received_at=NOW - 100)
    add_inbox(redis_client, settings.key_prefix, "inbox-only", NOW - 100)

    for tick in range(6):
        report = run_sweep(redis_client, settings, requeue, schedule, now=NOW + 15 * tick)
        assert report.sessions == {SESSION, "inbox-only"}  # still found each time

    assert sorted(requeue.calls) == sorted([(SESSION, 0), ("inbox-only", 0)])


def test_new_messages_behind_a_waiting_task_do_not_requeue_it(
    redis_client: redis.Redis, settings: Settings, requeue: Recorder, schedule: Recorder
) -> None:
    add_inbox(redis_client, settings.key_prefix, SESSION, NOW - 100)
    run_sweep(redis_client, settings, requeue, schedule)

    # More bubbles arrive; the waiting task will claim them all with the first one.
    add_inbox(redis_client, settings.key_prefix, SESSION, NOW - 50, NOW - 40)
    run_sweep(redis_client, settings, requeue, schedule, now=NOW + 15)

    assert requeue.calls == [(SESSION, 0)]


def test_a_session_stranded_anew_is_requeued_again(
    redis_client: redis.Redis, settings: Settings, requeue: Recorder, schedule: Recorder
) -> None:
    keys = session_keys(settings.key_prefix, SESSION)
    add_inbox(redis_client, settings.key_prefix, SESSION, NOW - 100)
    run_sweep(redis_client, settings, requeue, schedule)

    # The requeued task claimed the message and its worker died: a different state.
    redis_client.rpoplpush(keys.inbox, keys.processing)
    run_sweep(redis_client, settings, requeue, schedule, now=NOW + 15)
    # That claim was answered; a later message is stranded again.
    redis_client.delete(keys.processing)
    add_inbox(redis_client, settings.key_prefix, SESSION, NOW + 20)
    run_sweep(redis_client, settings, requeue, schedule, now=NOW + 60)

    assert requeue.calls == [(SESSION, 0)] * 3


def test_an_unchanged_stranded_session_is_requeued_again_after_the_window(
    make_settings, redis_client: redis.Redis, requeue: Recorder, schedule: Recorder
) -> None:
    # The window is WORKER_START_TIMEOUT_SECONDS: a task still not taken after it was lost.
    settings = make_settings(recovery_grace_seconds=GRACE, worker_start_timeout_seconds=1)
    add_processing(redis_client, settings.key_prefix, SESSION, received_at=NOW)

    run_sweep(redis_client, settings, requeue, schedule)
    run_sweep(redis_client, settings, requeue, schedule)
    assert requeue.calls == [(SESSION, 0)]
    time.sleep(1.1)
    run_sweep(redis_client, settings, requeue, schedule)

    assert requeue.calls == [(SESSION, 0)] * 2


def test_a_requeue_that_failed_is_tried_again_at_the_next_sweep(
    redis_client: redis.Redis, settings: Settings, schedule: Recorder
) -> None:
    add_processing(redis_client, settings.key_prefix, SESSION, received_at=NOW)
    calls: list[str] = []

    def broker_down(session: str, delay: float) -> None:
        calls.append(session)
        raise ConnectionError("broker unreachable")

    with pytest.raises(ConnectionError):
        run_sweep(redis_client, settings, broker_down, schedule)  # type: ignore[arg-type]
    requeue = Recorder([])
    run_sweep(redis_client, settings, requeue, schedule, now=NOW + 15)

    assert calls == [SESSION]
    assert requeue.calls == [(SESSION, 0)]


# --- the sweep and a delivery touching the same outbox entry ---------------------------


def delivery_meanwhile(monkeypatch: pytest.MonkeyPatch, change: Callable[[], None]) -> None:
    """Run `change` after the sweep read the outbox and before it writes: a delivery
    attempt that ran in between."""
    import worker.recovery

    read = worker.recovery.find_stranded

    def read_then_change(*args: object, **kwargs: object) -> SweepReport:
        report = read(*args, **kwargs)  # type: ignore[arg-type]
        change()
        return report

    monkeypatch.setattr(worker.recovery, "find_stranded", read_then_change)


def test_the_sweep_does_not_clobber_what_a_delivery_wrote_after_it_read(
    redis_client: redis.Redis,
    settings: Settings,
    requeue: Recorder,
    schedule: Recorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entry = outbox_entry(next_attempt_at=NOW - 600)
    add_outbox(redis_client, settings.key_prefix, entry)
    # The late attempt failed again and scheduled its own next attempt.
    retried = entry.model_copy(
        update={"attempts": 2, "last_error": "callback answered 502", "next_attempt_at": NOW + 4}
    )
    delivery_meanwhile(monkeypatch, lambda: add_outbox(redis_client, settings.key_prefix, retried))

    report = run_sweep(redis_client, settings, requeue, schedule)

    assert [e.idempotency_key for e in report.deliveries] == ["reply-1"]
    assert stored(redis_client, settings.key_prefix, SESSION, "reply-1") == retried
    assert schedule.calls == []  # the delivery scheduled its own attempt


def test_the_sweep_does_not_bring_back_a_reply_delivered_after_it_read(
    redis_client: redis.Redis,
    settings: Settings,
    requeue: Recorder,
    schedule: Recorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    add_outbox(redis_client, settings.key_prefix, outbox_entry(next_attempt_at=NOW - 600))
    keys = session_keys(settings.key_prefix, SESSION)
    delivery_meanwhile(monkeypatch, lambda: redis_client.hdel(keys.outbox, "reply-1"))

    run_sweep(redis_client, settings, requeue, schedule)

    assert not redis_client.exists(keys.outbox)
    assert schedule.calls == []


# --- replies older than the max age ----------------------------------------------------


def dead(client: redis.Redis, prefix: str) -> dict[str, OutboxEntry]:
    raw = client.hgetall(dead_letters(prefix))
    return {k: OutboxEntry.model_validate_json(v) for k, v in raw.items()}


def aged(next_attempt_at: float, age: float) -> OutboxEntry:
    return outbox_entry(next_attempt_at=next_attempt_at).model_copy(
        update={"created_at": NOW - age}
    )


@pytest.fixture
def lost_and_expired(redis_client: redis.Redis, settings: Settings) -> OutboxEntry:
    """In the outbox: overdue for 10 minutes, and a second older than the max age."""
    entry = aged(next_attempt_at=NOW - 600, age=settings.callback_max_age_seconds + 1)
    add_outbox(redis_client, settings.key_prefix, entry)
    return entry


def test_a_lost_reply_older_than_the_max_age_is_dead_lettered(
    redis_client: redis.Redis,
    settings: Settings,
    requeue: Recorder,
    schedule: Recorder,
    lost_and_expired: OutboxEntry,
) -> None:
    entry = lost_and_expired

    report = run_sweep(redis_client, settings, requeue, schedule)

    assert [e.idempotency_key for e in report.expired] == ["reply-1"]
    assert report.deliveries == []
    assert schedule.calls == []
    assert not redis_client.exists(session_keys(settings.key_prefix, SESSION).outbox)
    letter = dead(redis_client, settings.key_prefix)["reply-1"]
    assert letter.failed_at == NOW
    assert letter.attempts == entry.attempts
    assert "CALLBACK_MAX_AGE_SECONDS" in (letter.last_error or "")
    assert "callback answered 503" in (letter.last_error or "")
    assert letter.payload == entry.payload


def test_an_old_reply_whose_attempt_is_still_due_is_left_to_it(
    redis_client: redis.Redis, settings: Settings, requeue: Recorder, schedule: Recorder
) -> None:
    # Past the max age but its last scheduled attempt is not overdue: that attempt
    # dead-letters it if it fails.
    entry = aged(next_attempt_at=NOW - 5, age=settings.callback_max_age_seconds + 60)
    add_outbox(redis_client, settings.key_prefix, entry)

    report = run_sweep(redis_client, settings, requeue, schedule)

    assert report.expired == [] and report.deliveries == []
    assert stored(redis_client, settings.key_prefix, SESSION, "reply-1") == entry
    assert dead(redis_client, settings.key_prefix) == {}


def test_expiry_yields_to_a_delivery_that_updated_the_reply_meanwhile(
    redis_client: redis.Redis,
    settings: Settings,
    requeue: Recorder,
    schedule: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    lost_and_expired: OutboxEntry,
) -> None:
    entry = lost_and_expired
    retried = entry.model_copy(update={"attempts": 2, "next_attempt_at": NOW + 2})
    delivery_meanwhile(monkeypatch, lambda: add_outbox(redis_client, settings.key_prefix, retried))

    run_sweep(redis_client, settings, requeue, schedule)

    assert stored(redis_client, settings.key_prefix, SESSION, "reply-1") == retried
    assert dead(redis_client, settings.key_prefix) == {}


def test_expiry_of_a_reply_another_attempt_dead_lettered_meanwhile_keeps_one_letter(
    redis_client: redis.Redis,
    settings: Settings,
    requeue: Recorder,
    schedule: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    lost_and_expired: OutboxEntry,
) -> None:
    entry = lost_and_expired
    keys = session_keys(settings.key_prefix, SESSION)
    theirs = entry.model_copy(update={"attempts": 2, "failed_at": NOW - 1})

    def dead_lettered() -> None:
        redis_client.hset(dead_letters(settings.key_prefix), "reply-1", theirs.model_dump_json())
        redis_client.hdel(keys.outbox, "reply-1")

    delivery_meanwhile(monkeypatch, dead_lettered)

    run_sweep(redis_client, settings, requeue, schedule)

    assert not redis_client.exists(keys.outbox)
    assert list(dead(redis_client, settings.key_prefix)) == ["reply-1"]
