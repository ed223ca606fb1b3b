"""Real processes for end-to-end tests: gunicorn, a Celery worker, and an HTTP server that
plays n8n's Webhook node and records every callback it receives."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Callback:
    path: str
    headers: dict[str, str]
    body: dict


@dataclass
class CallbackReceiver:
    """Answers every POST with `status_for(n)` (n = 1-based count) and records it."""

    received: list[Callback] = field(default_factory=list)
    status_for: Callable[[int], int] = lambda n: 200
    _changed: threading.Condition = field(default_factory=threading.Condition)
    url: str = ""

    def record(self, callback: Callback) -> int:
        with self._changed:
            self.received.append(callback)
            count = len(self.received)
            self._changed.notify_all()
        return self.status_for(count)

    def wait_for(
        self, predicate: Callable[[list[Callback]], bool], timeout: float = 60
    ) -> list[Callback]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.received):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"callbacks so far: {[c.body for c in self.received]}")
                self._changed.wait(remaining)
            return list(self.received)

    def for_session(self, session_id: str) -> list[Callback]:
        with self._changed:
            return [c for c in self.received if c.body.get("session_id") == session_id]


@contextlib.contextmanager
def callback_receiver() -> Iterator[CallbackReceiver]:
    receiver = CallbackReceiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            status = receiver.record(Callback(self.path, dict(self.headers), body))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/n8n/reply"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


def process_env(settings_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.isupper() and not k.startswith("PYTEST")}
    env.update(settings_env)
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    return env


@contextlib.contextmanager
def running(
    command: list[str], env: dict[str, str], log_path: Path, cwd: Path
) -> Iterator[subprocess.Popen]:
    """Start a process with output to `log_path`; SIGTERM it (then SIGKILL) on exit."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, log_path: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
    raise TimeoutError(f"{what} not ready after {timeout}s\n{tail}")


def gunicorn_command(port: int, workers: int = 2) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn",
        "--config", str(ROOT / "gunicorn.conf.py"),
        "--bind", f"127.0.0.1:{port}",
        "--workers", str(workers),
        "webhook:create_app()",
    ]  # fmt: skip


def celery_worker_command(name: str, concurrency: int = 2, pool: str = "prefork") -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "worker", "worker",
        "--pool", pool,
        "--concurrency", str(concurrency),
        "--hostname", f"{name}@%h",
        "--loglevel", "INFO",
        "--without-gossip", "--without-mingle",
    ]  # fmt: skip


def http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


# --- Fault injection (tests/test_faults.py) --------------------------------------------


def signal_group(process: subprocess.Popen, sig: int) -> None:
    """Send `sig` to a process started by `running()` and to everything in its session
    (a prefork worker's children too), so SIGKILL leaves no child behind to finish the job."""
    os.killpg(os.getpgid(process.pid), sig)


def group_alive(pgid: int) -> bool:
    """Whether any process of a process group is still there (zombies reaped by init)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def worker_cli_command(*args: str) -> list[str]:
    """The operator CLI, `python -m worker …`."""
    return [sys.executable, "-m", "worker", *args]
