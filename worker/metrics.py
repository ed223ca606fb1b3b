"""Worker metrics, served by the worker's main process on WORKER_METRICS_PORT.

Counters are written by the prefork children (multiprocess mode) and merged at scrape
time; queue depth (from the broker) and dead letters (from REDIS_URL) are read when
Prometheus asks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from urllib.parse import urlsplit

import redis
from prometheus_client import Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from common.keys import dead_letters
from common.metrics_setup import registry_for_scrape
from common.redis_client import connect
from common.settings import Settings

log = logging.getLogger(__name__)

GENERATION_SECONDS = Histogram(
    "worker_generation_seconds",
    "Time spent in the model per reply",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
)
GENERATED_TOKENS = Counter("worker_generated_tokens_total", "New tokens generated")
REPLIES = Counter(
    "worker_replies_total",
    "Replies stored, by where their text came from",
    ["source"],  # model, fallback, fixed (reset confirmation or non-text reply)
)
GENERATION_BATCH_SIZE = Histogram(
    "worker_generation_batch_size",
    "Replies made by one generate call (micro-batching merges concurrent tasks)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
CALLBACKS = Counter(
    "worker_callback_attempts_total",
    "Callback attempts by outcome",
    ["outcome"],  # delivered, retry, dead
)


def broker_client(settings: Settings, conversations: redis.Redis) -> redis.Redis | None:
    """A client of the broker's Redis (BROKER_URL, else REDIS_URL, whose client is
    `conversations`); None for a broker of another kind."""
    url = settings.effective_broker_url
    if url == settings.redis_url:
        return conversations
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        log.warning("worker_queue_depth not served: the broker (%s://) is not a Redis", scheme)
        return None
    return connect(settings, url)


class RedisGauges(Collector):
    """Read at scrape time: work waiting for a worker, and replies nobody received.

    The queue lives in the broker, the dead letters with the conversations; either gauge
    is left out of a scrape while its Redis does not answer.
    """

    def __init__(
        self, client: redis.Redis, settings: Settings, broker: redis.Redis | None = None
    ) -> None:
        self._client = client
        self._settings = settings
        self._broker = broker if broker is not None else broker_client(settings, client)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._broker is not None:
            with contextlib.suppress(redis.RedisError):
                depth = self._broker.llen(self._settings.task_queue)
                yield GaugeMetricFamily(
                    "worker_queue_depth", "Tasks waiting in the broker queue", depth
                )
        with contextlib.suppress(redis.RedisError):
            dead = self._client.hlen(dead_letters(self._settings.key_prefix))
            yield GaugeMetricFamily("worker_dead_letters", "Replies in the dead-letter store", dead)


def serve(settings: Settings) -> None:
    """Start the scrape endpoint in a background thread of this (main) process."""
    registry = registry_for_scrape()
    registry.register(RedisGauges(connect(settings), settings))
    try:
        start_http_server(settings.worker_metrics_port, registry=registry)
    except OSError as exc:  # a busy port must not keep the worker from answering
        log.error("metrics not served on :%d: %s", settings.worker_metrics_port, exc)
        return
    log.info("metrics on :%d/metrics", settings.worker_metrics_port)
