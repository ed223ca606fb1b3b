"""The recovery sweep: find work that lost its task and queue it again.

Tasks can be lost (a worker SIGKILLed mid-generation, a publish that failed after the
message was stored, a reply whose first delivery never happened). The Redis state says
what is still owed, so a periodic sweep can re-queue it without trusting the broker:
- a `processing` list with no lock holder: a claim whose worker died;
- an `inbox` whose oldest message waited longer than the grace period with no holder;
- an outbox entry whose next attempt is overdue by the grace period: its delivery is
  scheduled again or, once the reply is older than CALLBACK_MAX_AGE_SECONDS, it moves to
  the dead letters (nothing delivers it any more; an operator may replay it).
Re-queued work is harmless when it turns out not to be needed: the claim/commit
protocol and the outbox make a second run a no-op.

A session is re-queued once per stranded state: a short-lived mark remembers the state
(the heads of its processing list and inbox) it was re-queued for, so while the task
waits (the only worker still loading its model, a long queue) later sweeps do not queue
more. Once the state changes (the task claimed something) or the mark expires after
WORKER_START_TIMEOUT_SECONDS, a session stranded again is re-queued again.

The sweep changes an outbox entry only if it still is what the sweep read (compare and
set): a delivery attempt that wrote attempts or an error in between wins.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pydantic
import redis
from redis.commands.core import Script

from common.keys import session_keys, session_of, session_pattern
from common.messages import OutboxEntry, PendingMessage
from common.settings import Settings
from worker.outbox import DeadLetters, Outbox, move_to_dead_letters

log = logging.getLogger(__name__)

# KEYS: mark   ARGV: state fingerprint, expiry in seconds. 1 if the session should be
# re-queued (not yet re-queued for this state), and marks it.
_MARK_REQUEUED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


@dataclass
class SweepReport:
    sessions: set[str] = field(default_factory=set)
    deliveries: list[OutboxEntry] = field(default_factory=list)
    # Overdue and older than CALLBACK_MAX_AGE_SECONDS: dead-lettered by `sweep`.
    expired: list[OutboxEntry] = field(default_factory=list)
    # Stranded sessions `sweep` left alone: already re-queued for the same state.
    already_requeued: set[str] = field(default_factory=set)
    # (session, idempotency key) → the outbox entry as read, for compare-and-set.
    raw: dict[tuple[str, str], str] = field(default_factory=dict, repr=False, compare=False)


def find_stranded(client: redis.Redis, settings: Settings, now: float) -> SweepReport:
    prefix, grace = settings.key_prefix, settings.recovery_grace_seconds
    report = SweepReport()
    for key in client.scan_iter(match=session_pattern(prefix, "processing"), count=500):
        session = session_of(prefix, key)
        if not client.exists(session_keys(prefix, session).lock):
            report.sessions.add(session)
    for key in client.scan_iter(match=session_pattern(prefix, "inbox"), count=500):
        session = session_of(prefix, key)
        oldest = client.lindex(key, 0)
        if oldest is None or client.exists(session_keys(prefix, session).lock):
            continue
        try:
            received_at = PendingMessage.model_validate_json(oldest).received_at
        except pydantic.ValidationError:
            # Another version's value, or one written by hand: skipped, so that it does not
            # stop the sweep of every other session, tick after tick.
            log.error("recovery: the oldest message in %s cannot be read; skipped", key)
            continue
        if now - received_at > grace:
            report.sessions.add(session)
    overdue = grace + settings.callback_timeout_seconds
    for key in client.scan_iter(match=session_pattern(prefix, "outbox"), count=500):
        for raw in client.hvals(key):
            try:
                entry = OutboxEntry.model_validate_json(raw)
            except pydantic.ValidationError:
                log.error("recovery: an entry of %s cannot be read; skipped", key)
                continue
            if now - entry.next_attempt_at <= overdue:
                continue
            if now - entry.created_at > settings.callback_max_age_seconds:
                report.expired.append(entry)
            else:
                report.deliveries.append(entry)
            report.raw[(entry.session_id, entry.idempotency_key)] = raw
    return report


def _state(client: redis.Redis, settings: Settings, session: str) -> str:
    """What a session is stranded with: the heads of its processing list and inbox."""
    keys = session_keys(settings.key_prefix, session)
    pipe = client.pipeline(transaction=False)
    pipe.lindex(keys.processing, 0)
    pipe.lindex(keys.inbox, 0)
    heads = pipe.execute()
    return hashlib.sha256("\n".join(h or "" for h in heads).encode()).hexdigest()[:32]


def _requeue_once(
    client: redis.Redis,
    settings: Settings,
    session: str,
    requeue: Callable[[str, float], None],
    mark_requeued: Script,
) -> bool:
    mark = session_keys(settings.key_prefix, session).requeued
    state = _state(client, settings, session)
    if not mark_requeued(keys=[mark], args=[state, settings.worker_start_timeout_seconds]):
        return False
    try:
        requeue(session, 0)
    except BaseException:
        client.delete(mark)  # nothing was queued: let the next sweep try again
        raise
    return True


def _expire(
    outbox: Outbox,
    dead_letters: DeadLetters,
    settings: Settings,
    entry: OutboxEntry,
    raw: str,
    now: float,
) -> bool:
    """Move a reply nothing will deliver any more to the dead letters (see worker.outbox)."""
    keys = session_keys(settings.key_prefix, entry.session_id)
    reason = (
        f"not delivered within CALLBACK_MAX_AGE_SECONDS ({settings.callback_max_age_seconds}s); "
        f"its last attempt was lost"
    )
    if entry.last_error:
        reason += f"; last error: {entry.last_error}"
    letter = entry.model_copy(update={"failed_at": now, "last_error": reason})
    # If the entry changed meanwhile, a delivery attempt is on it or settled it: it wins.
    return move_to_dead_letters(outbox, dead_letters, keys, letter, expected=raw)


def sweep(
    client: redis.Redis,
    settings: Settings,
    requeue: Callable[[str, float], None],
    schedule_delivery: Callable[[str, str, float], None],
    now: float,
) -> SweepReport:
    """Queue a reply task per stranded session and a delivery per overdue reply."""
    report = find_stranded(client, settings, now)
    requeued = 0
    mark_requeued = client.register_script(_MARK_REQUEUED)
    for session in sorted(report.sessions):
        if _requeue_once(client, settings, session, requeue, mark_requeued):
            requeued += 1
        else:
            report.already_requeued.add(session)
    outbox = Outbox(client)
    scheduled = 0
    for entry in report.deliveries:
        # Mark it as just scheduled, so the next sweep does not queue it a second time;
        # only if it is still what was read (else a delivery attempt is on it).
        keys = session_keys(settings.key_prefix, entry.session_id)
        raw = report.raw[(entry.session_id, entry.idempotency_key)]
        if outbox.replace(
            keys, entry.idempotency_key, raw, entry.model_copy(update={"next_attempt_at": now})
        ):
            schedule_delivery(entry.session_id, entry.idempotency_key, 0)
            scheduled += 1
    dead_letters = DeadLetters(client, settings.key_prefix)
    for entry in report.expired:
        raw = report.raw[(entry.session_id, entry.idempotency_key)]
        if _expire(outbox, dead_letters, settings, entry, raw, now):
            log.error(
                "recovery: reply %s older than %ds moved to the dead letters",
                entry.idempotency_key,
                settings.callback_max_age_seconds,
            )
    if requeued or scheduled:
        log.warning("recovery: re-queued %d session(s) and %d delivery(ies)", requeued, scheduled)
    if report.already_requeued:
        log.info(
            "recovery: %d stranded session(s) already re-queued, waiting for a worker",
            len(report.already_requeued),
        )
    return report
