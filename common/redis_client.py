"""How both processes open Redis: short timeouts so an outage is a fast error, not a hang."""

from __future__ import annotations

import redis

from common.settings import Settings


def connect(settings: Settings, url: str | None = None) -> redis.Redis:
    """A pooled client that decodes to str and gives up within the socket timeout.

    `url` defaults to REDIS_URL; the worker's metrics also open the broker this way.
    """
    return redis.Redis.from_url(
        url or settings.redis_url,
        decode_responses=True,
        socket_timeout=settings.redis_socket_timeout,
        socket_connect_timeout=settings.redis_socket_timeout,
        health_check_interval=30,
        retry_on_timeout=False,
    )
