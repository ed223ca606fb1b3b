"""Webhook variants for experiments: the real app with one setting changed at run time, to
measure what a change would buy (or what an earlier default cost) without touching
production code.

    gunicorn -c gunicorn.conf.py 'bench.variants:webhook_with_sent_events()'
"""

from __future__ import annotations

from flask import Flask

from webhook import create_app


def webhook_with_sent_events() -> Flask:
    """The webhook with Celery's task-sent event on, the previous default (common.queue now
    turns it off): each accepted message costs one more event serialisation and PUBLISH."""
    app = create_app()
    app.extensions["whatsapp_reply"].celery.conf.task_send_sent_event = True
    return app


def webhook_without_sent_events() -> Flask:
    """The webhook with Celery's task-sent event off, whatever common.queue says (it is the
    default now; bench.pipeline_overhead --no-events still names it explicitly)."""
    app = create_app()
    app.extensions["whatsapp_reply"].celery.conf.task_send_sent_event = False
    return app
