"""A Redis for the tests: the one at TEST_REDIS_URL if it answers, else a private
`redis-server` on a free port that lives as long as the test run."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import redis

DEFAULT_URL = "redis://127.0.0.1:6379/9"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@contextlib.contextmanager
def private_redis(port: int | None = None, appendonly: bool = False) -> Iterator[str]:
    """Start a throw-away redis-server; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("no Redis answers and redis-server is missing: apt install redis-server")
    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix="test-redis-")
    process = subprocess.Popen(
        [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", workdir,
            "--save", "",
            "--appendonly", "yes" if appendonly else "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while not answers(url):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"redis-server on port {port} did not start")
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def redis_for_tests() -> Iterator[str]:
    url = os.environ.get("TEST_REDIS_URL", DEFAULT_URL)
    if answers(url):
        yield url
    else:
        with private_redis() as private:
            yield private


class RestartableRedis:
    """A private redis-server that a test may stop cleanly and start again on the same port
    with the same data directory, as an operator restarting Redis would.

    Append-only file on, so what Redis acknowledged before a clean stop is there after the
    restart. `stop()` is SIGTERM, which Redis handles like SHUTDOWN (flushes the AOF).
    """

    def __init__(self, port: int | None = None, appendonly: bool = True) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is missing: apt install redis-server")
        self.binary = binary
        self.port = port or free_port()
        self.appendonly = appendonly
        self.workdir = tempfile.mkdtemp(prefix="test-redis-restartable-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("redis-server is already running")
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", self.workdir,
                "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not answers(self.url):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def stop(self, timeout: float = 10) -> None:
        """A clean stop; returns once the port is closed."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        self.process.wait(timeout=timeout)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def close(self) -> None:
        try:
            self.stop()
        except subprocess.TimeoutExpired:
            assert self.process is not None
            self.process.kill()
            self.process.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def restartable_redis(
    port: int | None = None, appendonly: bool = True
) -> Iterator[RestartableRedis]:
    """A started `RestartableRedis`, stopped and its directory removed on exit."""
    server = RestartableRedis(port, appendonly)
    try:
        server.start()
        yield server
    finally:
        server.close()
