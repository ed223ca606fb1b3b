"""Webhook variants for experiments: the real app with one setting changed at run time, to
measure what a change would buy before anyone makes it. Production code is untouched.

    gunicorn -c gunicorn.conf.py 'bench.variants:webhook_without_sent_events()'
"""

from __future__ import annotations

from flask import Flask

from webhook import create_app


def webhook_without_sent_events() -> Flask:
    """The webhook with Celery's task-sent event off (common.queue turns it on for flower):
    each accepted message then costs one Redis PUBLISH and one event serialisation less."""
    app = create_app()
    app.extensions["whatsapp_reply"].celery.conf.task_send_sent_event = False
    return app
