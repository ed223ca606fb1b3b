"""The Redis broker transport: kombu's own, keeping one client object per channel.

For every message it receives, acknowledges or publishes, kombu's Redis channel builds a
new `redis.Redis` around the same connection pool (`Channel.conn_or_acquire`), and
redis-py 7's constructor copies its table of ~200 response callbacks each time. That was
0.2 to 0.3 ms of a worker's CPU per task, against ~1.5 ms for everything Celery does with
one (bench/HISTORY.md, `bench.task_overhead`). A `redis.Redis` is safe to share between
threads (each command checks a connection out of the pool), so the channel keeps the one
it built and builds another only when it gets a new pool (kombu replaces the pool after
a connection error). Everything else is kombu's, unchanged.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import redis
from kombu.transport import redis as kombu_redis

# Used only for plain redis:// brokers: kombu picks TLS defaults from the rediss:// scheme
# and a different channel for sentinel://, which naming a transport would override.
TRANSPORT = "common.broker:Transport"


class Channel(kombu_redis.Channel):
    _shared_client: redis.Redis | None = None

    def _create_client(self, asynchronous: bool = False) -> redis.Redis:
        if asynchronous:  # kombu keeps that one itself (`Channel.client`)
            return super()._create_client(asynchronous=True)
        client = self._shared_client
        if client is None or client.connection_pool is not self.pool:
            client = self._shared_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


def transport_for(broker_url: str) -> str | None:
    """The transport to name for `broker_url`: ours for redis://, else kombu's choice."""
    return TRANSPORT if urlsplit(broker_url).scheme == "redis" else None
