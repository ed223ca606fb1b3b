"""The baseline: a bare Flask app answering POST /webhook with 202 and nothing else.

It reads and parses the same JSON body and answers the same kind of JSON, but does no
authentication, validation, Redis or Celery work: the floor that Flask under the same
gunicorn settings can reach on this machine.

    gunicorn -c gunicorn.conf.py 'bench.bare_app:create_app()'
"""

from __future__ import annotations

from flask import Flask, jsonify, request


def create_app() -> Flask:
    app = Flask(__name__, static_folder=None)

    @app.post("/webhook")
    def receive():  # type: ignore[no-untyped-def]
        body = request.get_json(silent=True) or {}
        return jsonify(status="queued", message_id=body.get("message_id")), 202

    @app.get("/health")
    def health():  # type: ignore[no-untyped-def]
        return jsonify(status="ok")

    return app
