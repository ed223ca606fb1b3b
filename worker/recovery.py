"""The recovery sweep: find work that lost its task and queue it again.

Tasks can be lost (a worker SIGKILLed mid-generation, a publish that failed after the
message was stored, a reply whose first delivery never happened). The Redis state says
what is still owed, so a periodic sweep can re-queue it without trusting the broker:
- a `processing` list with no lock holder: a claim whose worker died;
- an `inbox` whose oldest message waited longer than the grace period with no holder;
- an outbox entry whose next attempt is overdue by the grace period.
Re-queued work is harmless when it turns out not to be needed: the claim/commit
protocol and the outbox make a second run a no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from common.keys import session_keys, session_of, session_pattern
from common.messages import OutboxEntry, PendingMessage
from common.settings import Settings
from worker.outbox import Outbox

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    sessions: set[str] = field(default_factory=set)
    deliveries: list[OutboxEntry] = field(default_factory=list)


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
        if now - PendingMessage.model_validate_json(oldest).received_at > grace:
            report.sessions.add(session)
    overdue = grace + settings.callback_timeout_seconds
    for key in client.scan_iter(match=session_pattern(prefix, "outbox"), count=500):
        for raw in client.hvals(key):
            entry = OutboxEntry.model_validate_json(raw)
            if now - entry.next_attempt_at > overdue:
                report.deliveries.append(entry)
    return report


def sweep(
    client: redis.Redis,
    settings: Settings,
    requeue: Callable[[str, float], None],
    schedule_delivery: Callable[[str, str, float], None],
    now: float,
) -> SweepReport:
    """Queue a reply task per stranded session and a delivery per overdue reply."""
    report = find_stranded(client, settings, now)
    for session in sorted(report.sessions):
        requeue(session, 0)
    outbox = Outbox(client)
    for entry in report.deliveries:
        # Mark it as just scheduled, so the next sweep does not queue it a second time.
        keys = session_keys(settings.key_prefix, entry.session_id)
        if outbox.update(keys, entry.model_copy(update={"next_attempt_at": now})):
            schedule_delivery(entry.session_id, entry.idempotency_key, 0)
    if report.sessions or report.deliveries:
        log.warning(
            "recovery: re-queued %d session(s) and %d delivery(ies)",
            len(report.sessions),
            len(report.deliveries),
        )
    return report
