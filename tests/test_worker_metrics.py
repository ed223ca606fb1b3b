"""The worker's scrape-time gauges read the right Redis: queue depth from the broker
(BROKER_URL, which may be another Redis or database than REDIS_URL), dead letters from
the data Redis."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from common.keys import dead_letters
from common.redis_client import connect
from common.settings import Settings
from worker.metrics import RedisGauges


def other_database(url: str) -> str:
    """The same server as `url`, another database number."""
    parts = urlsplit(url)
    current = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{(current + 1) % 16}"))


@pytest.fixture
def broker_settings(make_settings, settings: Settings) -> Settings:
    return make_settings(
        key_prefix=settings.key_prefix,
        task_queue=settings.task_queue,
        broker_url=other_database(settings.redis_url),
    )


@pytest.fixture
def broker(broker_settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(broker_settings.effective_broker_url, decode_responses=True)
    yield client
    client.delete(broker_settings.task_queue)
    client.close()


def samples(gauges: RedisGauges) -> dict[str, float]:
    return {s.name: s.value for family in gauges.collect() for s in family.samples}


def test_queue_depth_is_read_from_the_broker(
    broker_settings: Settings, broker: redis.Redis, redis_client: redis.Redis
) -> None:
    queue = broker_settings.task_queue
    broker.rpush(queue, "t1", "t2", "t3")
    redis_client.rpush(queue, "not-a-task")  # same name in the data Redis: not the queue
    redis_client.hset(dead_letters(broker_settings.key_prefix), "k1", "{}")

    got = samples(RedisGauges(connect(broker_settings), broker_settings))

    assert got == {"worker_queue_depth": 3, "worker_dead_letters": 1}


def test_without_a_broker_url_the_queue_is_in_redis_url(
    settings: Settings, redis_client: redis.Redis
) -> None:
    redis_client.rpush(settings.task_queue, "t1", "t2")

    got = samples(RedisGauges(connect(settings), settings))

    assert got == {"worker_queue_depth": 2, "worker_dead_letters": 0}


def test_an_unreachable_broker_leaves_only_the_queue_depth_out(
    make_settings, settings: Settings, redis_client: redis.Redis
) -> None:
    unreachable = make_settings(
        key_prefix=settings.key_prefix,
        broker_url="redis://127.0.0.1:9/0",
        redis_socket_timeout=0.2,
    )

    got = samples(RedisGauges(connect(settings), unreachable))

    assert got == {"worker_dead_letters": 0}


def test_a_broker_that_is_not_redis_serves_no_queue_depth(
    make_settings, settings: Settings, redis_client: redis.Redis
) -> None:
    amqp = make_settings(key_prefix=settings.key_prefix, broker_url="amqp://guest@127.0.0.1//")

    assert samples(RedisGauges(connect(settings), amqp)) == {"worker_dead_letters": 0}


# The celery command imports prometheus_client (through flower's plugin) before the app;
# a prefork child then counts a reply, and the scrape in the main process must see it.
PREFORK_COUNT = """
import os, sys, prometheus_client
from common.metrics_setup import ENV, ensure_multiprocess_dir, registry_for_scrape
os.environ.pop(ENV, None)
path = ensure_multiprocess_dir("worker")
from prometheus_client import Counter
replies = Counter("replies_total", "replies")
child = os.fork()
if child == 0:
    replies.inc(42)
    os._exit(0)
os.waitpid(child, 0)
value = registry_for_scrape().get_sample_value("replies_total")
print(value, path)
"""


def test_prefork_children_counts_reach_the_scrape_when_the_client_came_first() -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", PREFORK_COUNT],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    value, path = done.stdout.split()
    assert float(value) == 42.0
    assert not os.path.exists(path), "the directory made for the process outlived it"
