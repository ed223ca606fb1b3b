"""The responder with a real Redis and a stand-in model: coalescing, per-session
exclusion, the re-check after release, and what reaches the callback."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from common.conversation_store import ConversationStore
from common.inbox import Inbox
from common.keys import session_keys
from common.messages import CallbackPayload, OutboxEntry, PendingMessage
from worker.context import Turn
from worker.responder import MAX_ROUNDS_PER_TASK, Responder, idempotency_key, trim_reply
from worker.session_lock import LockRenewer, SessionLocks

SESSION = "+59170000009"
RENEWER = LockRenewer()  # one per process, as in a worker


class Recorder:
    """Stand-in model and callback: records what it saw, optionally runs a hook."""

    def __init__(self) -> None:
        self.prompts: list[list[Turn]] = []
        self.delivered: list[tuple[CallbackPayload, str, str]] = []
        self.requeued: list[tuple[str, float]] = []
        self.during_generation = lambda: None
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def generate(self, turns: Sequence[Turn]) -> str:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self.prompts.append(list(turns))
            self.during_generation()
            return f"reply to {turns[-1].content!r}"
        finally:
            with self._lock:
                self.in_flight -= 1

    def deliver(self, entry: OutboxEntry) -> bool:
        self.delivered.append((entry.payload, entry.url, entry.idempotency_key))
        return True

    def requeue(self, session_id: str, delay: float) -> None:
        self.requeued.append((session_id, delay))


def build(settings, redis_client, generate=None):
    """A responder on the real Redis with the recorder standing in for model and n8n."""
    recorder = Recorder()
    inbox = Inbox(redis_client, settings)
    responder = Responder(
        client=redis_client,
        settings=settings,
        inbox=inbox,
        store=ConversationStore(redis_client, settings),
        generate=generate or recorder.generate,
        deliver=recorder.deliver,
        requeue=recorder.requeue,
        model_name="stand-in",
        locks=SessionLocks(redis_client, settings.lock_timeout_seconds, RENEWER),
    )
    return responder, inbox, recorder, session_keys(settings.key_prefix, SESSION)


@pytest.fixture
def setup(settings, redis_client):
    return build(settings, redis_client)


def message(n: int, **extra) -> PendingMessage:
    return PendingMessage(
        message_id=f"m{n}", session_id=SESSION, sender=SESSION, text=f"bubble {n}", **extra
    )


def test_pending_bubbles_are_answered_together_as_one_user_turn(setup):
    responder, inbox, recorder, keys = setup
    for n in range(3):
        inbox.accept(keys, message(n, metadata={"phone_number_id": "77"}))

    assert responder.answer(SESSION) == 1

    assert recorder.prompts == [[Turn("user", "bubble 0\nbubble 1\nbubble 2")]]
    ((payload, url, key),) = recorder.delivered
    assert payload.in_reply_to == ["m0", "m1", "m2"]
    assert payload.metadata == {"phone_number_id": "77"}
    assert payload.to == SESSION and payload.session_id == SESSION
    assert payload.reply == "reply to 'bubble 0\\nbubble 1\\nbubble 2'"
    assert url == "http://127.0.0.1:9/n8n-callback"
    assert key == idempotency_key(SESSION, ["m0", "m1", "m2"])


def test_context_includes_earlier_turns(setup):
    responder, inbox, recorder, keys = setup
    inbox.accept(keys, message(0))
    responder.answer(SESSION)
    inbox.accept(keys, message(1))

    responder.answer(SESSION)

    assert recorder.prompts[1] == [
        Turn("user", "bubble 0"),
        Turn("assistant", "reply to 'bubble 0'"),
        Turn("user", "bubble 1"),
    ]


def test_message_arriving_during_generation_is_answered_next_by_the_holder(setup):
    responder, inbox, recorder, keys = setup
    inbox.accept(keys, message(0))
    accepted = []
    arrivals = iter([lambda: accepted.append(inbox.accept(keys, message(1))), lambda: None])
    recorder.during_generation = lambda: next(arrivals)()

    assert responder.answer(SESSION) == 2

    assert [p.in_reply_to for p, _, _ in recorder.delivered] == [["m0"], ["m1"]]
    assert [a.needs_task for a in accepted] == [False]  # so only the holder could answer it


def test_messages_arriving_during_generation_are_answered_without_letting_the_lock_go(
    setup, redis_client
):
    # Each round after the first claims what arrived in the step that would have released
    # the lock: the lock keeps its token throughout, so no other task could take a turn.
    responder, inbox, recorder, keys = setup
    counter = iter(range(1, 3))
    tokens: list[str] = []

    def arrive() -> None:
        tokens.append(redis_client.get(keys.lock))
        if (n := next(counter, None)) is not None:
            assert not inbox.accept(keys, message(n)).needs_task

    inbox.accept(keys, message(0))
    recorder.during_generation = arrive

    assert responder.answer(SESSION) == 3

    assert [p.in_reply_to for p, _, _ in recorder.delivered] == [["m0"], ["m1"], ["m2"]]
    assert len(tokens) == 3 and len(set(tokens)) == 1 and tokens[0]
    assert not redis_client.exists(keys.lock) and not inbox.has_pending(keys)


class ArrivalAfterEmptyClaim(Inbox):
    """An inbox where one message arrives just after a claim that found nothing."""

    def __init__(self, inbox: Inbox, keys, late: PendingMessage) -> None:
        self.__dict__.update(inbox.__dict__)
        self._keys, self._late = keys, late

    def lock_and_claim(self, keys, token, lock_ttl_ms):  # type: ignore[no-untyped-def]
        claim = super().lock_and_claim(keys, token, lock_ttl_ms)
        if claim is not None and not claim.batch and self._late is not None:
            assert not self.accept(self._keys, self._late).needs_task  # the lock is held
            self._late = None
        return claim


def test_a_holder_that_claimed_nothing_still_looks_again(setup):
    # A task whose message an earlier holder already answered: while it holds the lock, a
    # new message gets no task, so this holder must answer it before leaving.
    responder, inbox, recorder, keys = setup
    responder.inbox = ArrivalAfterEmptyClaim(inbox, keys, message(7))

    assert responder.answer(SESSION) == 1

    assert [p.in_reply_to for p, _, _ in recorder.delivered] == [["m7"]]
    assert not inbox.has_pending(keys)


def test_session_locked_by_another_worker_is_left_alone(setup, redis_client):
    responder, inbox, recorder, keys = setup
    inbox.accept(keys, message(0))
    redis_client.set(keys.lock, "someone-else", px=30_000)

    assert responder.answer(SESSION) == 0

    assert recorder.prompts == []
    assert redis_client.llen(keys.inbox) == 1


def test_busy_session_is_handed_to_a_fresh_task_after_some_rounds(setup):
    responder, inbox, recorder, keys = setup
    counter = iter(range(1, 100))
    inbox.accept(keys, message(0))
    recorder.during_generation = lambda: inbox.accept(keys, message(next(counter)))

    assert responder.answer(SESSION) == MAX_ROUNDS_PER_TASK

    assert recorder.requeued == [(SESSION, 0)]


def test_concurrent_answerers_never_generate_for_one_session_at_once(setup, redis_client):
    responder, inbox, recorder, keys = setup
    recorder.during_generation = lambda: time.sleep(0.02)
    sent = [f"m{n}" for n in range(12)]

    def feed() -> None:
        for n in range(12):
            inbox.accept(keys, message(n))
            time.sleep(0.005)

    def work() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (inbox.has_pending(keys) or feeder.is_alive()):
            responder.answer(SESSION)

    feeder = threading.Thread(target=feed)
    workers = [threading.Thread(target=work) for _ in range(4)]
    feeder.start()
    for worker in workers:
        worker.start()
    for thread in [feeder, *workers]:
        thread.join(timeout=20)

    assert recorder.max_in_flight == 1
    answered = [mid for payload, _, _ in recorder.delivered for mid in payload.in_reply_to]
    assert answered == sent


def test_stale_claim_of_a_dead_worker_is_answered_alone_first(setup):
    responder, inbox, recorder, keys = setup
    inbox.accept(keys, message(0))
    inbox.claim(keys)  # a worker claimed m0 and died
    inbox.accept(keys, message(1))

    assert responder.answer(SESSION) == 2

    assert [p.in_reply_to for p, _, _ in recorder.delivered] == [["m0"], ["m1"]]


def test_message_callback_url_wins_over_the_default(setup):
    responder, inbox, recorder, keys = setup
    inbox.accept(keys, message(0, callback_url="https://n8n.example.com/webhook/a"))

    responder.answer(SESSION)

    assert recorder.delivered[0][1] == "https://n8n.example.com/webhook/a"


def test_idempotency_key_depends_only_on_session_and_messages():
    assert idempotency_key("s", ["a", "b"]) == idempotency_key("s", ["a", "b"])
    assert idempotency_key("s", ["a", "b"]) != idempotency_key("s", ["a"])
    assert idempotency_key("s", ["a"]) != idempotency_key("t", ["a"])


def test_failed_generation_keeps_the_batch_for_the_retry(setup, redis_client):
    responder, inbox, recorder, keys = setup
    inbox.accept(keys, message(0))
    inbox.accept(keys, message(1))

    def fail() -> None:
        raise RuntimeError("model crashed")

    recorder.during_generation = fail
    with pytest.raises(RuntimeError):
        responder.answer(SESSION)
    assert redis_client.llen(keys.processing) == 2
    assert not redis_client.exists(keys.lock)  # released, so the retry is not blocked

    recorder.during_generation = lambda: None
    assert responder.answer(SESSION) == 1

    ((payload, _, key),) = recorder.delivered
    assert payload.in_reply_to == ["m0", "m1"]
    assert key == idempotency_key(SESSION, ["m0", "m1"])


def test_reply_waits_in_the_outbox_until_delivered(setup, redis_client):
    responder, inbox, _recorder, keys = setup
    seen_in_outbox: list[bool] = []

    def deliver(entry: OutboxEntry) -> bool:
        seen_in_outbox.append(redis_client.hexists(keys.outbox, entry.idempotency_key))
        raise ConnectionError("worker died while posting")

    responder.deliver = deliver
    inbox.accept(keys, message(0))

    with pytest.raises(ConnectionError):
        responder.answer(SESSION)

    assert seen_in_outbox == [True]
    (raw,) = redis_client.hvals(keys.outbox)
    entry = OutboxEntry.model_validate_json(raw)
    assert entry.payload.in_reply_to == ["m0"]
    assert entry.url == "http://127.0.0.1:9/n8n-callback"
    assert redis_client.llen(keys.processing) == 0  # the turn is committed


def test_debounce_waits_for_silence_then_answers_all_bubbles(make_settings, redis_client):
    settings = make_settings(debounce_seconds=5, debounce_max_wait_seconds=30)
    responder, inbox, recorder, keys = build(settings, redis_client)
    now = time.time()
    inbox.accept(keys, message(0, received_at=now - 3))
    inbox.accept(keys, message(1, received_at=now - 1))

    assert responder.answer(SESSION) == 0

    ((session, delay),) = recorder.requeued
    assert session == SESSION
    assert 3.5 < delay <= 4.0  # 5 s of silence after the newest bubble, 1 s already passed
    assert recorder.prompts == []
    assert redis_client.llen(keys.inbox) == 2

    redis_client.delete(keys.inbox)
    inbox.accept(keys, message(2, received_at=now - 29.5))  # the user kept typing for 29.5 s
    inbox.accept(keys, message(3, received_at=now))
    recorder.requeued.clear()

    assert responder.answer(SESSION) == 0
    ((_, capped),) = recorder.requeued
    assert capped <= 0.5  # never more than DEBOUNCE_MAX_WAIT_SECONDS after the oldest

    redis_client.delete(keys.inbox)
    inbox.accept(keys, message(4, received_at=now - 6))
    inbox.accept(keys, message(5, received_at=now - 5.5))
    assert responder.answer(SESSION) == 1
    assert recorder.delivered[-1][0].in_reply_to == ["m4", "m5"]


def test_reset_forgets_the_conversation_and_confirms(setup, settings, redis_client):
    responder, inbox, recorder, keys = setup
    inbox.accept(keys, message(0))
    responder.answer(SESSION)
    old_id = responder.store.history(keys).conversation_id
    inbox.accept(keys, message(1, kind="reset"))

    responder.answer(SESSION)

    assert len(recorder.prompts) == 1  # the reset itself was not sent to the model
    assert recorder.delivered[-1][0].reply == settings.reset_reply
    history = responder.store.history(keys)
    assert [m.content for m in history.messages] == [settings.reset_reply]
    assert history.conversation_id == recorder.delivered[-1][0].conversation_id
    assert old_id.startswith(f"conv_{SESSION}_")


def test_text_after_a_reset_in_the_same_batch_starts_the_new_conversation(setup):
    responder, inbox, recorder, keys = setup
    inbox.accept(keys, message(0))
    responder.answer(SESSION)
    for n, kind in ((1, "text"), (2, "reset"), (3, "text")):
        inbox.accept(keys, message(n, kind=kind))

    responder.answer(SESSION)

    assert recorder.prompts[-1] == [Turn("user", "bubble 3")]
    assert recorder.delivered[-1][0].in_reply_to == ["m1", "m2", "m3"]
    contents = [m.content for m in responder.store.history(keys).messages]
    assert contents == ["bubble 3", "reply to 'bubble 3'"]


def test_non_text_alone_gets_the_fixed_reply_without_the_model(setup, settings):
    responder, inbox, recorder, keys = setup
    inbox.accept(keys, message(0, kind="non_text"))

    responder.answer(SESSION)

    assert recorder.prompts == []
    assert recorder.delivered[-1][0].reply == settings.non_text_reply


def test_text_with_an_image_is_answered_by_the_model_from_the_text(setup):
    responder, inbox, recorder, keys = setup
    inbox.accept(keys, message(0, kind="non_text"))
    inbox.accept(keys, message(1))

    responder.answer(SESSION)

    assert recorder.prompts == [[Turn("user", "bubble 1")]]
    assert recorder.delivered[-1][0].in_reply_to == ["m0", "m1"]


def test_long_replies_are_trimmed_to_the_whatsapp_limit(make_settings, redis_client):
    settings = make_settings(max_reply_chars=50)
    responder, inbox, recorder, keys = build(
        settings, redis_client, generate=lambda turns: "palabra " * 40
    )
    inbox.accept(keys, message(0))

    responder.answer(SESSION)

    reply = recorder.delivered[-1][0].reply
    assert len(reply) <= 50
    assert reply.endswith("palabra…")
    assert responder.store.history(keys).messages[-1].content == reply


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("short", 10, "short"),
        ("exactly10!", 10, "exactly10!"),
        ("one two three four", 10, "one two…"),
        ("abcdefghijklmnop", 10, "abcdefghi…"),
    ],
)
def test_trim_reply(text, limit, expected):
    assert trim_reply(text, limit) == expected
    assert len(trim_reply(text, limit)) <= limit
