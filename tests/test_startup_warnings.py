"""What `check_startup` tells an operator about open endpoints in development."""

from __future__ import annotations

import logging

import pytest

from webhook.auth import check_startup


def test_missing_admin_token_names_every_open_admin_endpoint(
    make_settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(webhook_token="t", environment="development")

    with caplog.at_level(logging.WARNING, logger="webhook.auth"):
        check_startup(settings)

    [warning] = [r.getMessage() for r in caplog.records if "ADMIN_TOKEN" in r.getMessage()]
    for endpoint in ("/chat/history", "/metrics", "/redis/"):
        assert endpoint in warning, warning


def test_an_admin_token_silences_it(make_settings, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(webhook_token="t", admin_token="a", environment="development")

    with caplog.at_level(logging.WARNING, logger="webhook.auth"):
        check_startup(settings)

    assert not [r for r in caplog.records if "ADMIN_TOKEN" in r.getMessage()]
