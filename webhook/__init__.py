"""The Flask webhook n8n posts WhatsApp messages to. `create_app()` is the only entry."""

from __future__ import annotations

from flask import Flask

from common.logging_setup import configure_logging
from common.settings import Settings, get_settings
from webhook.body_limit import ChunkedBodyLimit


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app: configuration, Redis and queue services, error handlers, blueprints."""
    from webhook import (
        auth,
        debug,
        errors,
        health,
        history,
        intake,
        metrics,
        openapi,
        request_log,
        services,
    )

    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.effective_log_format, lean_records=True)
    auth.check_startup(settings)
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.wsgi_app = ChunkedBodyLimit(app.wsgi_app, settings.max_body_bytes)  # type: ignore[method-assign]
    app.json.sort_keys = False
    services.init_app(app, settings)
    errors.register(app)
    request_log.register(app)
    app.register_blueprint(intake.bp)
    app.register_blueprint(history.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    openapi.init_app(app, settings)
    if not settings.is_production:
        app.register_blueprint(debug.bp)
    return app
