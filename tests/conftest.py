"""Shared fixtures: a real Redis, isolated settings per test, the Flask test client.

Every test gets its own key prefix and task queue name, so tests never see each other's
keys and never touch anyone else's data; the keys are deleted afterwards (no FLUSHALL).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from common.settings import Settings, get_settings
from tests.redis_server import redis_for_tests

pytest_plugins = ["tests.fixtures_model"]

CALLBACK_URL = "http://127.0.0.1:9/n8n-callback"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_for_tests() as url:
        yield url


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests build Settings explicitly; a developer's .env or shell must not leak in."""
    monkeypatch.chdir(Path(__file__).parent)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def make_settings(redis_url: str):
    """Settings on the test Redis with a unique prefix and queue; overrides as kwargs."""
    unique = uuid.uuid4().hex[:10]

    def build(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "redis_url": redis_url,
            "key_prefix": f"test-{unique}",
            "task_queue": f"test-queue-{unique}",
            "n8n_callback_url": CALLBACK_URL,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return build


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings()


@pytest.fixture
def redis_client(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    yield client
    for pattern in (f"{settings.key_prefix}:*", f"{settings.task_queue}*"):
        keys = list(client.scan_iter(match=pattern, count=500))
        if keys:
            client.delete(*keys)
    client.close()


@pytest.fixture
def app(settings: Settings, redis_client: redis.Redis) -> Flask:
    from webhook import create_app

    return create_app(settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
