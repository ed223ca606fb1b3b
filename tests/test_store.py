"""Inbox and conversation store scripts against a real Redis: TTLs, the history cap, and
the claim/commit protocol that keeps a crash from losing or doubling an answer."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from common.conversation_store import ConversationStore, new_conversation_id
from common.inbox import Inbox, LockedClaim, Released
from common.keys import session_keys
from common.messages import PendingMessage, StoredMessage
from tests.factories import outbox_entry


@pytest.fixture
def parts(settings, redis_client):
    keys = session_keys(settings.key_prefix, "+59170000001")
    return keys, Inbox(redis_client, settings), ConversationStore(redis_client, settings)


def pending(n: int) -> PendingMessage:
    return PendingMessage(
        message_id=f"m{n}", session_id="+59170000001", sender="+59170000001", text=f"text {n}"
    )


def answer(store, keys, batch, reply: str = "ok") -> bool:
    messages = [
        StoredMessage(message_id=m.message_id, role="user", content=m.text, timestamp="t")
        for m in batch.messages
    ]
    messages.append(
        StoredMessage(message_id=f"r-{reply}", role="assistant", content=reply, timestamp="t")
    )
    return store.commit(
        keys,
        batch,
        conversation_id=store.load(keys).conversation_id
        or new_conversation_id("+59170000001", 1700000000),
        user_id="+59170000001",
        messages=messages,
        metadata={"name": "Ana"},
        now="2026-01-01T00:00:00+00:00",
        outbox=None,
    )


def test_claim_takes_everything_pending_in_order(parts, redis_client):
    keys, inbox, _ = parts
    for n in range(3):
        assert inbox.accept(keys, pending(n)).status == "queued"

    batch = inbox.claim(keys)

    assert [m.message_id for m in batch.messages] == ["m0", "m1", "m2"]
    assert redis_client.llen(keys.inbox) == 0
    assert redis_client.llen(keys.processing) == 3
    assert inbox.claim(keys).raw == batch.raw  # unanswered claim is handed out again


def test_claim_moves_an_inbox_of_any_size(parts, redis_client, settings):
    # Lua's unpack() refuses ~8000 values: a claim built on it lost the whole inbox.
    keys, inbox, _ = parts
    redis_client.rpush(keys.inbox, *[pending(n).model_dump_json() for n in range(9000)])

    batch = inbox.claim(keys)

    assert len(batch.messages) == 9000
    assert batch.messages[-1].message_id == "m8999"
    assert redis_client.llen(keys.processing) == 9000
    assert redis_client.exists(keys.inbox) == 0
    assert 0 < redis_client.ttl(keys.processing) <= settings.session_expire_time


def test_lock_and_claim_claims_only_when_it_takes_the_lock(parts, redis_client):
    keys, inbox, _ = parts
    for n in range(2):
        inbox.accept(keys, pending(n))

    claim = inbox.lock_and_claim(keys, "token-a", 30_000)

    assert claim is not None
    assert [m.message_id for m in claim.batch.messages] == ["m0", "m1"]
    assert redis_client.get(keys.lock) == "token-a"
    assert 29_000 < redis_client.pttl(keys.lock) <= 30_000
    assert redis_client.llen(keys.processing) == 2
    # Held: a second worker takes nothing, and its message stays in the inbox.
    inbox.accept(keys, pending(2))
    assert inbox.lock_and_claim(keys, "token-b", 30_000) is None
    assert redis_client.get(keys.lock) == "token-a"
    assert redis_client.llen(keys.inbox) == 1
    assert redis_client.llen(keys.processing) == 2


def test_lock_and_claim_reads_the_history_as_load_does(parts, redis_client):
    keys, inbox, store = parts
    inbox.accept(keys, pending(0))
    assert answer(store, keys, inbox.claim(keys), reply="hello") is True
    inbox.accept(keys, pending(1))

    claim = inbox.lock_and_claim(keys, "token", 30_000)

    assert claim is not None and [m.message_id for m in claim.batch.messages] == ["m1"]
    assert ConversationStore.from_claim(claim) == store.load(keys)
    assert claim.conversation_id == "conv_+59170000001_1700000000"
    assert [m["content"] for m in store.load(keys).turns] == ["text 0", "hello"]


def test_lock_and_claim_of_a_new_session_has_no_history(parts):
    keys, inbox, store = parts
    inbox.accept(keys, pending(0))
    claim = inbox.lock_and_claim(keys, "token", 30_000)
    assert claim is not None
    assert (claim.history_json, claim.conversation_id) == ("[]", None)
    assert ConversationStore.from_claim(claim) == store.load(keys)


def test_lock_and_claim_hands_back_an_unanswered_claim_first(parts, redis_client):
    keys, inbox, _ = parts
    inbox.accept(keys, pending(0))
    first = inbox.claim(keys)  # claimed by a worker that died
    inbox.accept(keys, pending(1))

    again = inbox.lock_and_claim(keys, "token", 30_000)

    assert again is not None and again.batch.raw == first.raw
    assert redis_client.llen(keys.inbox) == 1


def test_lock_and_claim_with_nothing_pending_still_takes_the_lock(parts, redis_client):
    keys, inbox, _ = parts
    claim = inbox.lock_and_claim(keys, "token", 30_000)
    assert claim is not None and not claim.batch
    assert redis_client.get(keys.lock) == "token"


def test_commit_stores_turn_clears_processing_and_sets_ttl(parts, settings, redis_client):
    keys, inbox, store = parts
    inbox.accept(keys, pending(0))
    batch = inbox.claim(keys)

    assert answer(store, keys, batch, reply="hello") is True

    assert store.history(keys).conversation_id == "conv_+59170000001_1700000000"
    assert redis_client.exists(keys.processing) == 0
    history = store.history(keys)
    assert [(m.role, m.content) for m in history.messages] == [
        ("user", "text 0"),
        ("assistant", "hello"),
    ]
    assert history.metadata == {"name": "Ana"}
    for key in (keys.conversation, keys.messages):
        assert (
            settings.session_expire_time - 5 < redis_client.ttl(key) <= settings.session_expire_time
        )


def test_accept_renews_the_conversation_ttl(parts, redis_client, settings):
    keys, inbox, store = parts
    inbox.accept(keys, pending(0))
    answer(store, keys, inbox.claim(keys))
    redis_client.expire(keys.conversation, 5)
    redis_client.expire(keys.messages, 5)

    inbox.accept(keys, pending(1))

    assert redis_client.ttl(keys.conversation) > 5
    assert redis_client.ttl(keys.messages) > 5


def test_history_is_capped_to_the_newest_messages(make_settings, redis_client):
    settings = make_settings(max_history_messages=4)
    keys = session_keys(settings.key_prefix, "+59170000001")
    inbox, store = Inbox(redis_client, settings), ConversationStore(redis_client, settings)

    for n in range(5):
        inbox.accept(keys, pending(n))
        answer(store, keys, inbox.claim(keys), reply=f"r{n}")

    contents = [m.content for m in store.history(keys).messages]
    assert contents == ["text 3", "r3", "text 4", "r4"]


def test_second_commit_of_the_same_claim_writes_nothing(parts):
    keys, inbox, store = parts
    inbox.accept(keys, pending(0))
    batch = inbox.claim(keys)
    assert answer(store, keys, batch, reply="first") is True

    assert answer(store, keys, batch, reply="second") is False

    assert [m.content for m in store.history(keys).messages] == ["text 0", "first"]


def test_commit_refuses_a_claim_that_no_longer_matches(parts):
    keys, inbox, store = parts
    inbox.accept(keys, pending(0))
    stale = inbox.claim(keys)
    answer(store, keys, stale)
    inbox.accept(keys, pending(1))
    inbox.claim(keys)  # a newer claim now sits in processing

    assert answer(store, keys, stale, reply="late") is False


def test_withdraw_undoes_an_accept(parts, redis_client):
    keys, inbox, _ = parts
    message = pending(0)
    inbox.accept(keys, message)

    assert inbox.withdraw(keys, message) is True

    assert redis_client.llen(keys.inbox) == 0
    assert inbox.accept(keys, message).status == "queued"  # no longer a duplicate


def test_erase_removes_history_and_pending(parts, redis_client):
    keys, inbox, store = parts
    inbox.accept(keys, pending(0))
    answer(store, keys, inbox.claim(keys))
    inbox.accept(keys, pending(1))

    assert store.erase(keys) is True

    assert store.history(keys) is None
    assert redis_client.llen(keys.inbox) == 0
    assert store.erase(keys) is False


def test_keys_of_one_session_share_a_cluster_hash_slot():
    keys = session_keys("wa", "+59170000001")
    other = session_keys("wa", "+59170000002")
    names = [
        keys.conversation,
        keys.messages,
        keys.inbox,
        keys.processing,
        keys.lock,
        keys.rate,
        keys.seen("wamid.1"),
    ]

    assert len({key_slot(name.encode()) for name in names}) == 1
    assert key_slot(keys.inbox.encode()) != key_slot(other.inbox.encode())


def test_conversation_metadata_is_kept_when_a_later_turn_has_none(parts):
    keys, inbox, store = parts
    inbox.accept(keys, pending(0))
    answer(store, keys, inbox.claim(keys))  # stores {"name": "Ana"}
    inbox.accept(keys, pending(1))
    batch = inbox.claim(keys)
    messages = [StoredMessage(message_id="m1", role="user", content="x", timestamp="t")]

    store.commit(
        keys,
        batch,
        conversation_id=store.load(keys).conversation_id
        or new_conversation_id("+59170000001", 1700000100),
        user_id="+59170000001",
        messages=messages,
        metadata={},
        now="2026-01-01T00:01:00+00:00",
        outbox=None,
    )

    assert store.history(keys).metadata == {"name": "Ana"}


def test_the_outbox_outlives_the_longest_delivery_not_the_conversation(make_settings, redis_client):
    # Conversations expire after a minute; n8n may be retried for an hour. A reply still
    # being retried must not expire with the conversation: it is delivered or dead-lettered.
    settings = make_settings(session_expire_time=60, callback_max_age_seconds=3600)
    keys = session_keys(settings.key_prefix, "+59170000001")
    inbox, store = Inbox(redis_client, settings), ConversationStore(redis_client, settings)
    inbox.accept(keys, pending(0))
    batch = inbox.claim(keys)
    messages = [StoredMessage(message_id="m0", role="user", content="x", timestamp="t")]

    assert store.commit(
        keys,
        batch,
        conversation_id="conv_1",
        user_id="+59170000001",
        messages=messages,
        metadata={},
        now="2026-01-01T00:00:00+00:00",
        outbox=outbox_entry("k1"),
    )

    assert 0 < redis_client.ttl(keys.messages) <= 60
    ttl = redis_client.ttl(keys.outbox)
    longest_delivery = (
        settings.callback_max_age_seconds
        + settings.callback_max_backoff_seconds
        + settings.callback_timeout_seconds
        + settings.recovery_grace_seconds
        + settings.recovery_interval_seconds
    )
    assert ttl >= longest_delivery
    from common.conversation_store import outbox_ttl_seconds

    assert 0 <= outbox_ttl_seconds(settings) - ttl <= 2


def test_load_reads_history_and_conversation_id_together(parts):
    keys, inbox, store = parts
    empty = store.load(keys)
    assert (empty.turns, empty.conversation_id) == ([], None)  # before the first reply

    inbox.accept(keys, pending(0))
    assert answer(store, keys, inbox.claim(keys), reply="first")
    inbox.accept(keys, pending(1))
    assert answer(store, keys, inbox.claim(keys), reply="second")

    loaded = store.load(keys)
    assert [(m["role"], m["content"]) for m in loaded.turns] == [
        ("user", "text 0"),
        ("assistant", "first"),
        ("user", "text 1"),
        ("assistant", "second"),
    ]
    assert [{"role": m.role, "content": m.content} for m in store.turns(keys)] == loaded.turns
    assert loaded.conversation_id == "conv_+59170000001_1700000000"


def test_claim_more_keeps_the_lock_and_claims_what_waits(parts, redis_client):
    keys, inbox, store = parts
    inbox.accept(keys, pending(0))
    first = inbox.lock_and_claim(keys, "token", 30_000)
    assert first is not None and answer(store, keys, first.batch, reply="hello") is True
    inbox.accept(keys, pending(1))  # arrived while the lock was held: no task of its own
    redis_client.pexpire(keys.lock, 5_000)

    more = inbox.claim_more_or_release(keys, "token", 30_000)

    assert isinstance(more, LockedClaim)
    assert [m.message_id for m in more.batch.messages] == ["m1"]
    assert ConversationStore.from_claim(more) == store.load(keys)
    assert redis_client.get(keys.lock) == "token"
    assert 29_000 < redis_client.pttl(keys.lock) <= 30_000  # a fresh TTL, same token
    assert redis_client.llen(keys.inbox) == 0


def test_claim_more_with_nothing_waiting_releases_the_lock(parts, redis_client):
    keys, inbox, _ = parts
    assert inbox.lock_and_claim(keys, "token", 30_000) is not None

    assert inbox.claim_more_or_release(keys, "token", 30_000) == Released(ours=True, waiting=0)
    assert not redis_client.exists(keys.lock)


def test_claim_more_with_a_lost_lock_claims_nothing_and_leaves_the_new_holder(parts, redis_client):
    keys, inbox, _ = parts
    redis_client.set(keys.lock, "new-holder", px=30_000)  # ours expired, another took it
    inbox.accept(keys, pending(0))

    assert inbox.claim_more_or_release(keys, "token", 30_000) == Released(ours=False, waiting=1)
    assert redis_client.get(keys.lock) == "new-holder"
    assert redis_client.llen(keys.inbox) == 1 and redis_client.llen(keys.processing) == 0
