"""The Celery worker: `celery -A worker worker` and `celery -A worker flower` find `app`."""

from worker.app import app

__all__ = ["app"]
