"""gunicorn settings for the webhook (`gunicorn -c gunicorn.conf.py 'webhook:create_app()'`).

Binds to $PORT (default 8000) with $WEB_CONCURRENCY sync workers (default 2), and prepares
the shared metrics directory in the master so every worker's counters reach `/metrics`.
"""

import os

from common.heap import freeze_startup_objects
from common.metrics_setup import prepare_multiprocess_dir

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# sync workers, on purpose: gthread measured +25-45% requests/s, but kept-alive
# connections could all stick to one worker, and after a burst above capacity a worker
# stopped answering for 10-40 s (bench/HISTORY.md, section 1). Add workers for throughput.
timeout = 30
# Requests are logged by the app itself (webhook.request_log), without phone numbers.
accesslog = None


def on_starting(server):
    prepare_multiprocess_dir("webhook")


def post_worker_init(worker):
    # The app is loaded: a full garbage collection scanning it would stop the worker for
    # ~30 ms, long enough to leave a queue behind at high load (common.heap).
    freeze_startup_objects()


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
