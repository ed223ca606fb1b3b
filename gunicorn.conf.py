"""gunicorn settings for the webhook (`gunicorn -c gunicorn.conf.py 'webhook:create_app()'`).

Binds to $PORT (default 8000) with $WEB_CONCURRENCY workers (default 2) of $WEB_THREADS
threads (default 4), and prepares the shared metrics directory in the master so every
worker's counters reach `/metrics`.
"""

import os

from common.metrics_setup import prepare_multiprocess_dir

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# A request spends most of its time waiting on Redis; threads let a worker take the next
# one meanwhile (about +25% requests/s on 2 cores, BENCHMARKS.md).
worker_class = "gthread"
threads = int(os.environ.get("WEB_THREADS", "4"))
timeout = 30
# Requests are logged by the app itself (webhook.request_log), without phone numbers.
accesslog = None


def on_starting(server):
    prepare_multiprocess_dir("webhook")


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
