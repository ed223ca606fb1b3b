"""CPU of one reply round in the worker, without Celery: `Responder.answer` for a session
with one new message, an instant model, the real Redis and a local callback receiver.

The responder is the one a worker process builds (`worker.runtime`), with production
settings (signed callbacks) and its model call replaced by a fixed reply. Before each
measured call one message is accepted into the session's inbox, as the webhook would
(not measured). Sessions are answered in turn and first warmed up until their history is
full (MAX_HISTORY_MESSAGES), as in a long conversation. The time is the calling thread's
CPU (`time.thread_time`): the receiver's thread and Redis are left out. Rounds alternate
between the code as it is and the variants, so drift hits all alike.

    python -m bench.reply_round [--rounds 4] [--calls 500] [--sessions 8]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

from bench.harness import Run, callback_receiver, conditions, markdown_table, save_results
from bench.variants import lock_and_claim_history_as_list, lock_then_claim
from common.inbox import Inbox, LockedClaim
from common.keys import SessionKeys, session_keys
from common.messages import PendingMessage
from common.settings import get_settings

if TYPE_CHECKING:  # importing the worker package reads the settings: not before main sets them
    from worker.responder import Responder

REPLY = "Claro, te ayudo con eso."
LockAndClaim = Callable[[Inbox, SessionKeys, str, int], LockedClaim | None]


def instant_responder() -> Responder:
    """The responder a worker process builds (`worker.runtime`), with a fixed reply for a
    model; reads the settings of the environment it is called in."""
    from worker import runtime

    return replace(runtime.responder(), generate=lambda turns: REPLY)


def accept_message(responder: Responder, session: str, message_id: str) -> None:
    """Queue one message for `session`, as the webhook would (no task)."""
    keys = session_keys(responder.settings.key_prefix, session)
    message = PendingMessage(
        message_id=message_id,
        session_id=session,
        sender=session,
        text=f"Hola, ¿abren hoy? {message_id}",
        metadata={"phone_number_id": "106540352242922"},
    )
    if responder.inbox.accept(keys, message).status != "queued":
        raise SystemExit(f"message {message_id} was not queued")


@contextmanager
def as_is() -> Iterator[None]:
    yield


@contextmanager
def lock_and_claim_replaced_by(function: LockAndClaim) -> Iterator[None]:
    original = Inbox.lock_and_claim
    Inbox.lock_and_claim = function  # type: ignore[method-assign]
    try:
        yield
    finally:
        Inbox.lock_and_claim = original  # type: ignore[method-assign]


VARIANTS: dict[str, Callable[[], contextmanager]] = {  # type: ignore[type-arg]
    "as is": as_is,
    "history read as one reply item per message (before)": partial(
        lock_and_claim_replaced_by, lock_and_claim_history_as_list
    ),
    "lock, claim and history in three round trips (before)": partial(
        lock_and_claim_replaced_by, lock_then_claim
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=500, help="per variant and round")
    parser.add_argument("--sessions", type=int, default=8)
    args = parser.parse_args(argv)

    run = Run.new("round")
    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        with callback_receiver() as receiver:
            os.environ.update(run.env(N8N_CALLBACK_URL=receiver.url, LOG_LEVEL="WARNING"))
            get_settings.cache_clear()
            responder = instant_responder()  # reads the settings above
            settings = responder.settings
            sessions = [f"+5917{n:07d}" for n in range(args.sessions)]
            sent = 0

            def one_round(session: str) -> float:
                nonlocal sent
                sent += 1
                accept_message(responder, session, f"wamid.round.{sent}")
                started = time.thread_time()
                replies = responder.answer(session)
                spent = time.thread_time() - started
                assert replies == 1, f"round for {session} made {replies} replies"
                return spent

            for _ in range(settings.max_history_messages // 2 + 5):  # full histories
                for session in sessions:
                    one_round(session)
            for _ in range(args.rounds):
                for name, variant in VARIANTS.items():
                    with variant():
                        spent = sum(one_round(sessions[n % len(sessions)])
                                    for n in range(args.calls))  # fmt: skip
                    results[name].append(round(spent / args.calls * 1e6))
            assert receiver.count() == sent, "every reply reached the receiver"
    finally:
        purged = run.purge()
    rows = [[name, ", ".join(str(v) for v in values), min(values)]
            for name, values in results.items()]  # fmt: skip
    print(markdown_table(["code", "CPU µs per reply round, each round", "best"], rows))
    print(f"- {conditions()}; {purged} Redis keys purged")
    path = save_results("reply_round", {"calls": args.calls, "sessions": args.sessions,
                                        "cpu_us": results})  # fmt: skip
    print(f"- results: {path.relative_to(path.parent.parent.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
