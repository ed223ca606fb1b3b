"""The per-conversation lock on a real Redis: exclusive, renewed while held (by one thread
for all of a process's locks), forgotten soon after a holder dies, and quiet when it was
lost before release.

Expiry tests use the smallest allowed lock timeout (2 s), so they take a few seconds.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from common.inbox import Released
from common.keys import SessionKeys, session_keys
from common.settings import Settings
from worker.session_lock import LockRenewer, SessionLocks

TTL = 2.0


@pytest.fixture
def renewer() -> Iterator[LockRenewer]:
    renewer = LockRenewer()
    yield renewer
    renewer.close()


@pytest.fixture
def keys(settings: Settings) -> SessionKeys:
    # Under the test's prefix, so the redis_client fixture cleans it up.
    return session_keys(settings.key_prefix, "5511999990000")


@pytest.fixture
def name(keys: SessionKeys) -> str:
    return keys.lock


def renewal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "session-lock-renewal"]


def test_a_second_holder_is_refused_while_the_first_holds(
    redis_client: redis.Redis, keys: SessionKeys, name: str, renewer: LockRenewer
) -> None:
    with SessionLocks(redis_client, 30, renewer).hold(keys) as first:
        assert first.acquired
        token = redis_client.get(name)
        assert token

        with SessionLocks(redis_client, 30, renewer).hold(keys) as second:
            assert not second.acquired

        # The refused one must not have released (or touched) the holder's lock.
        assert redis_client.get(name) == token
        with SessionLocks(redis_client, 30, renewer).hold(keys) as third:
            assert not third.acquired

    assert not redis_client.exists(name)
    with SessionLocks(redis_client, 30, renewer).hold(keys) as again:
        assert again.acquired


def test_locks_of_different_sessions_are_independent(
    redis_client: redis.Redis,
    settings: Settings,
    keys: SessionKeys,
    name: str,
    renewer: LockRenewer,
) -> None:
    other = session_keys(settings.key_prefix, "5511888880000")
    with (
        SessionLocks(redis_client, 30, renewer).hold(keys) as a,
        SessionLocks(redis_client, 30, renewer).hold(other) as b,
    ):
        assert (a.acquired, b.acquired) == (True, True)
    assert not redis_client.exists(name)
    assert not redis_client.exists(other.lock)


def test_the_lock_has_a_short_expiry(
    redis_client: redis.Redis, keys: SessionKeys, name: str, renewer: LockRenewer
) -> None:
    with SessionLocks(redis_client, TTL, renewer).hold(keys) as held:
        assert held.acquired
        ttl_ms = redis_client.pttl(name)
        assert 0 < ttl_ms <= TTL * 1000


def test_a_lock_held_longer_than_its_ttl_is_renewed(
    redis_client: redis.Redis, keys: SessionKeys, name: str, renewer: LockRenewer
) -> None:
    with SessionLocks(redis_client, TTL, renewer).hold(keys) as held:
        assert held.acquired
        token = redis_client.get(name)
        assert renewer.holding == 1
        start = time.monotonic()
        while time.monotonic() - start < TTL * 1.5:
            assert redis_client.get(name) == token, "the lock expired while its holder lived"
            assert 0 < redis_client.pttl(name) <= TTL * 1000
            time.sleep(0.2)
        # Well past the first expiry: another worker is still refused.
        with SessionLocks(redis_client, TTL, renewer).hold(keys) as second:
            assert not second.acquired
        assert redis_client.get(name) == token

    assert not redis_client.exists(name)
    assert renewer.holding == 0


def test_a_dead_holders_lock_is_taken_over_after_its_ttl(
    redis_client: redis.Redis, keys: SessionKeys, name: str, renewer: LockRenewer
) -> None:
    # A worker killed mid-generation: its lock is there, nobody renews it.
    redis_client.set(name, "dead-worker-token", px=int(TTL * 1000))

    with SessionLocks(redis_client, TTL, renewer).hold(keys) as early:
        assert not early.acquired
    assert redis_client.get(name) == "dead-worker-token"

    deadline = time.monotonic() + TTL + 1
    while redis_client.exists(name) and time.monotonic() < deadline:
        time.sleep(0.05)

    with SessionLocks(redis_client, TTL, renewer).hold(keys) as later:
        assert later.acquired
        assert redis_client.get(name) not in (None, "dead-worker-token")
    assert not redis_client.exists(name)


def test_exit_after_the_lock_expired_does_not_raise(
    redis_client: redis.Redis, keys: SessionKeys, name: str, renewer: LockRenewer
) -> None:
    with SessionLocks(redis_client, 30, renewer).hold(keys) as held:
        assert held.acquired
        redis_client.delete(name)  # as if it had expired

    assert not redis_client.exists(name)
    assert renewer.holding == 0


def test_a_stolen_lock_is_neither_renewed_nor_released_by_its_old_holder(
    redis_client: redis.Redis, keys: SessionKeys, name: str, renewer: LockRenewer
) -> None:
    with SessionLocks(redis_client, TTL, renewer).hold(keys) as held:
        assert held.acquired
        redis_client.delete(name)
        with SessionLocks(redis_client, 30, renewer).hold(keys) as thief:
            assert thief.acquired
            thief_token = redis_client.get(name)
        # The thief released; now a plain key stands in for a new holder's lock.
        redis_client.set(name, "new-holder", px=30_000)
        time.sleep(TTL / 3 + 0.3)  # at least one renewal tick of the old holder
        assert redis_client.get(name) == "new-holder"
        assert redis_client.pttl(name) > 25_000  # not reset to the old holder's TTL

    # The old holder's exit left the new holder's lock alone.
    assert thief_token and thief_token != "new-holder"
    assert redis_client.get(name) == "new-holder"
    assert renewer.holding == 0


def test_an_error_inside_releases_the_lock(
    redis_client: redis.Redis, keys: SessionKeys, name: str, renewer: LockRenewer
) -> None:
    with (
        pytest.raises(RuntimeError, match="generation failed"),
        SessionLocks(redis_client, 30, renewer).hold(keys) as held,
    ):
        assert held.acquired
        raise RuntimeError("generation failed")

    assert not redis_client.exists(name)
    assert renewer.holding == 0


def test_an_error_inside_a_refused_lock_propagates_and_keeps_the_holders_lock(
    redis_client: redis.Redis, keys: SessionKeys, name: str, renewer: LockRenewer
) -> None:
    redis_client.set(name, "holder", px=30_000)

    with pytest.raises(ValueError), SessionLocks(redis_client, 30, renewer).hold(keys) as held:
        assert not held.acquired
        raise ValueError("boom")

    assert redis_client.get(name) == "holder"


def test_only_one_of_many_concurrent_workers_gets_the_lock(
    redis_client: redis.Redis, keys: SessionKeys, name: str, renewer: LockRenewer
) -> None:
    results: list[bool] = []
    all_tried = threading.Barrier(8)
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        with SessionLocks(redis_client, 30, renewer).hold(keys) as held:
            results.append(held.acquired)
            all_tried.wait(timeout=5)  # hold until every worker has tried

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)

    assert sorted(results) == [False] * 7 + [True]
    assert not redis_client.exists(name)


def test_one_thread_renews_every_lock_the_process_holds(
    redis_client: redis.Redis, settings: Settings, renewer: LockRenewer
) -> None:
    sessions = [session_keys(settings.key_prefix, f"55119999900{n:02d}") for n in range(6)]
    names = [k.lock for k in sessions]
    locks = SessionLocks(redis_client, TTL, renewer)
    before = set(renewal_threads())  # other tests' renewers may still run
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(locks.hold(k)) for k in sessions]
        assert [h.acquired for h in held] == [True] * 6
        assert renewer.holding == 6
        assert len(set(renewal_threads()) - before) == 1
        tokens = [redis_client.get(n) for n in names]
        time.sleep(TTL * 1.5)  # past every lock's first expiry
        assert [redis_client.get(n) for n in names] == tokens
    assert renewer.holding == 0
    assert not any(redis_client.exists(n) for n in names)


def test_a_short_lived_lock_taken_while_a_long_one_is_held_is_renewed_in_time(
    redis_client: redis.Redis, settings: Settings, renewer: LockRenewer
) -> None:
    # The thread sleeps until the long lock's first renewal (10 s away); the short lock
    # needs its first renewal long before that.
    long_keys, short_keys = (
        session_keys(settings.key_prefix, f"551199999{n}") for n in ("0100", "0200")
    )
    with SessionLocks(redis_client, 30.0, renewer).hold(long_keys) as long_held:
        assert long_held.acquired
        time.sleep(0.1)  # the thread is asleep now, waiting for the long lock
        with SessionLocks(redis_client, TTL, renewer).hold(short_keys) as short_held:
            assert short_held.acquired
            token = redis_client.get(short_keys.lock)
            time.sleep(TTL * 1.5)  # past the short lock's first expiry
            assert redis_client.get(short_keys.lock) == token, "the short lock expired"
    assert renewer.holding == 0


def _hold_past_ttl_in_child(url: str, keys: SessionKeys, renewer: LockRenewer, out) -> None:
    client = redis.Redis.from_url(url, decode_responses=True)
    with SessionLocks(client, TTL, renewer).hold(keys) as held:
        token = client.get(keys.lock)
        time.sleep(TTL * 1.5)
        out.send((held.acquired, token is not None and client.get(keys.lock) == token))


def test_a_forked_child_gets_its_own_renewal_thread(
    redis_client: redis.Redis, settings: Settings, keys: SessionKeys, renewer: LockRenewer
) -> None:
    # The parent's thread is started first and does not survive the fork (prefork pool).
    other = session_keys(settings.key_prefix, "5511777770000")
    before = set(renewal_threads())
    with SessionLocks(redis_client, 30, renewer).hold(other):
        pass
    assert renewer.holding == 0
    assert len(set(renewal_threads()) - before) == 1  # the parent's thread, kept running
    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(
        target=_hold_past_ttl_in_child, args=(settings.redis_url, keys, renewer, send)
    )
    child.start()
    assert receive.poll(TTL * 3), "the child did not answer"
    assert receive.recv() == (True, True), "the child's lock expired while it held it"
    child.join(10)
    assert child.exitcode == 0


def test_release_counts_what_waits_for_the_session_in_the_same_step(
    redis_client: redis.Redis, keys: SessionKeys, renewer: LockRenewer
) -> None:
    # What arrived while the lock was held has no task of its own: the holder sees it here.
    with SessionLocks(redis_client, 30, renewer).hold(keys) as held:
        assert held.acquired and held.waiting is None
        redis_client.rpush(keys.inbox, "new-1", "new-2")
        redis_client.rpush(keys.processing, "claimed")
    assert held.waiting == 3
    assert not redis_client.exists(keys.lock)


def test_a_refused_hold_counts_nothing(
    redis_client: redis.Redis, keys: SessionKeys, renewer: LockRenewer
) -> None:
    redis_client.set(keys.lock, "holder", px=30_000)
    redis_client.rpush(keys.inbox, "waiting")
    with SessionLocks(redis_client, 30, renewer).hold(keys) as held:
        pass
    assert (held.acquired, held.waiting) == (False, None)
    assert redis_client.get(keys.lock) == "holder"


def test_a_custom_acquire_takes_the_lock_it_is_given(
    redis_client: redis.Redis, keys: SessionKeys, renewer: LockRenewer
) -> None:
    # The token and TTL the lock was taken with are the ones renewed and released.
    calls: list[tuple[str, int]] = []

    def acquire(token: str, ttl_ms: int) -> bool:
        calls.append((token, ttl_ms))
        return bool(redis_client.set(keys.lock, token, nx=True, px=ttl_ms))

    with SessionLocks(redis_client, 30, renewer).hold(keys, acquire) as held:
        [(token, ttl_ms)] = calls
        assert held.acquired and ttl_ms == 30_000
        assert redis_client.get(keys.lock) == token and renewer.holding == 1
    assert not redis_client.exists(keys.lock) and renewer.holding == 0

    redis_client.set(keys.lock, "holder", px=30_000)
    with SessionLocks(redis_client, 30, renewer).hold(keys, acquire) as refused:
        assert not refused.acquired and renewer.holding == 0
    assert redis_client.get(keys.lock) == "holder"


def test_an_acquire_that_fails_after_taking_the_lock_frees_it(
    redis_client: redis.Redis, keys: SessionKeys, renewer: LockRenewer
) -> None:
    def take_then_fail(token: str, ttl_ms: int) -> bool:
        redis_client.set(keys.lock, token, nx=True, px=ttl_ms)
        raise redis.ResponseError("the script's second step failed")

    with (
        pytest.raises(redis.ResponseError),
        SessionLocks(redis_client, 30, renewer).hold(keys, take_then_fail),
    ):
        pass
    assert not redis_client.exists(keys.lock)
    assert renewer.holding == 0


def test_a_round_that_keeps_the_lock_holds_it_to_the_block_end(
    redis_client: redis.Redis, keys: SessionKeys, renewer: LockRenewer
) -> None:
    locks = SessionLocks(redis_client, 30, renewer)
    with locks.hold(keys) as held:
        seen: list[tuple[str, int]] = []

        def keep(token: str, ttl_ms: int) -> str:
            seen.append((token, ttl_ms))
            return "next round"

        assert locks.end_round(held, keep) == "next round"
        assert seen == [(held.token, 30_000)] and not held.released
        assert redis_client.get(keys.lock) == held.token and renewer.holding == 1
        redis_client.rpush(keys.inbox, "new")
    assert held.waiting == 1  # released and counted at the block's end, as always
    assert not redis_client.exists(keys.lock) and renewer.holding == 0


def test_a_round_that_lets_the_lock_go_leaves_the_next_holder_alone(
    redis_client: redis.Redis, keys: SessionKeys, renewer: LockRenewer
) -> None:
    locks = SessionLocks(redis_client, 30, renewer)
    with locks.hold(keys) as held:

        def let_go(token: str, ttl_ms: int) -> Released:
            assert redis_client.delete(keys.lock) == 1
            return Released(ours=True, waiting=0)

        assert locks.end_round(held, let_go) is None
        assert held.released and held.waiting == 0
        redis_client.set(keys.lock, "next-holder", px=30_000)  # a new task took it
    assert redis_client.get(keys.lock) == "next-holder"
    assert renewer.holding == 0


def test_no_renewal_runs_while_a_round_may_be_letting_the_lock_go(
    redis_client: redis.Redis,
    keys: SessionKeys,
    renewer: LockRenewer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A renewal between the script's release and the hold's end would find the lock gone
    # and warn that it was lost: the renewer skips the lock while the round ends.
    locks = SessionLocks(redis_client, TTL, renewer)
    with locks.hold(keys) as held:

        def slow_let_go(token: str, ttl_ms: int) -> Released:
            redis_client.delete(keys.lock)
            time.sleep(TTL / 3 + 0.5)  # a renewal falls due meanwhile
            return Released(ours=True, waiting=0)

        assert locks.end_round(held, slow_let_go) is None
    assert "lost" not in caplog.text
