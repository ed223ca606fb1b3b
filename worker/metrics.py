"""Worker metrics, served by the worker's main process on WORKER_METRICS_PORT.

Counters are written by the prefork children (multiprocess mode) and merged at scrape
time; queue depth and dead letters are read from Redis when Prometheus asks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

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
CALLBACKS = Counter(
    "worker_callback_attempts_total",
    "Callback attempts by outcome",
    ["outcome"],  # delivered, retry, dead
)


class RedisGauges(Collector):
    """Read at scrape time: work waiting for a worker, and replies nobody received."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._client = client
        self._settings = settings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            depth = self._client.llen(self._settings.task_queue)
            dead = self._client.hlen(dead_letters(self._settings.key_prefix))
        except redis.RedisError:
            return
        yield GaugeMetricFamily("worker_queue_depth", "Tasks waiting in the broker queue", depth)
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
