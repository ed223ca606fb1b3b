"""The broker transport: kombu's Redis transport with one client object per channel."""

from __future__ import annotations

import pytest

from common import broker
from common.queue import make_celery, send_reply_task

SESSION = "+59170000003"


@pytest.mark.parametrize(
    ("url", "ours"),
    [
        ("redis://127.0.0.1:6379/0", True),
        ("rediss://cache.example.test:6380/0?ssl_cert_reqs=required", False),
        ("sentinel://127.0.0.1:26379", False),
    ],
)
def test_only_plain_redis_brokers_get_the_shared_client_transport(make_settings, url, ours):
    app = make_celery(make_settings(broker_url=url))
    assert app.conf.broker_transport == (broker.TRANSPORT if ours else None)
    # kombu keeps the TLS defaults of rediss:// and the sentinel channel when not named.
    assert (app.connection_for_write().transport_cls == broker.TRANSPORT) is ours


def test_a_channel_builds_one_client_and_another_only_for_a_new_pool(settings):
    app = make_celery(settings)
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        assert isinstance(channel, broker.Channel)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            assert first.connection_pool is channel.pool
        # kombu drops its pools after a connection error; the next client uses the new one.
        channel._pool = None
        with channel.conn_or_acquire() as after_reset:
            assert after_reset is not first
            assert after_reset.connection_pool is channel.pool
        # The asynchronous client (BRPOP) is still kombu's own, separate one.
        assert channel.client is not first


def test_a_received_message_is_held_until_acknowledged(settings, redis_client):
    """Late acknowledgement goes through the shared client: the message waits in kombu's
    unacked hash while a worker holds it and leaves it on ack."""
    app = make_celery(settings)
    send_reply_task(app, SESSION)
    with app.connection_for_write() as connection:
        queue = connection.SimpleQueue(settings.task_queue, no_ack=False)
        try:
            message = queue.get(timeout=5)
            tag = message.delivery_tag
            unacked = connection.default_channel.unacked_key
            assert message.payload[0] == [SESSION]
            assert redis_client.hexists(unacked, tag)
            message.ack()
            assert not redis_client.hexists(unacked, tag)
            assert redis_client.llen(settings.task_queue) == 0
        finally:
            queue.close()
            for binding in redis_client.scan_iter(match=f"_kombu.binding.*{settings.task_queue}*"):
                redis_client.delete(binding)
