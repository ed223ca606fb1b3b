"""A small HTTP/1.1 load driver: asyncio protocols over raw sockets, little CPU per request.

Every request is a `POST /webhook` with a fresh `message_id` and a fresh sender (so a
fresh conversation: no inbox fills up). Connections are kept alive when the server
allows it; gunicorn's sync workers answer `Connection: close`, and then each request
opens a new connection, whose set-up counts in its latency as it would for n8n.

- closed: `--connections` clients, each sending its next request when the last answer
  arrived (saturation). Latency runs from send to the last byte of the answer.
- open: requests start at a fixed `--rate` whatever the server does, each on an idle
  connection or a new one. Latency runs from the *scheduled* start, so a server that
  falls behind is charged for the wait (no coordinated omission); how late the driver
  itself started requests is reported as `send_lag_ms`.

Run as its own process by the benchmarks; prints one JSON object:

    python -m bench.loadgen --port 8000 --mode closed --connections 16 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import time
import uuid
from collections import Counter
from collections.abc import Sequence

BODY = (
    '{"message_id":"wamid.bench-%s-%d","from":"+59%010d","text":"Hola, quiero una cita para '
    'ma\\u00f1ana","name":"Bench","metadata":{"phone_number_id":"106540352242922"}}'
)


class Requests:
    """Builds each request's bytes: same shape, fresh message id and sender."""

    def __init__(self, port: int, token: str) -> None:
        self._run = uuid.uuid4().hex[:8]
        self._numbers = itertools.count(1)
        self._head = (
            f"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nX-Webhook-Token: {token}\r\n"
            "Content-Length: %d\r\n\r\n"
        )

    def next(self) -> bytes:
        n = next(self._numbers)
        body = (BODY % (self._run, n, n)).encode()
        return (self._head % len(body)).encode() + body


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one request at a time, answers framed by Content-Length."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.open = False
        self._buffer = bytearray()
        self._answer: asyncio.Future[tuple[int, bool]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.open = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(ConnectionError("connection closed before the answer"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        answer = self._answer
        if answer is None or answer.done():
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self._buffer[:end]).lower()
        length, close = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                close = b"close" in value
        if len(self._buffer) < end + 4 + length:
            return
        del self._buffer[: end + 4 + length]
        answer.set_result((int(head[9:12]), close))

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bool]]:
        self._answer = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(request)
        return self._answer

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.open = False


class Driver:
    def __init__(self, port: int, token: str, record_from: float, record_until: float) -> None:
        self.port = port
        self.requests = Requests(port, token)
        self.record_from, self.record_until = record_from, record_until
        self.latencies_ms: list[float] = []
        self.send_lag_ms: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.idle: list[Connection] = []
        self.answered = 0  # warm-up and tail included

    async def connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(Connection, "127.0.0.1", self.port)
        return conn

    async def exchange(self, conn: Connection | None, started: float) -> Connection | None:
        """One request; records it if it started inside the window. Returns a reusable conn."""
        try:
            if conn is None or not conn.open:
                conn = await self.connect()
            status, close = await conn.send(self.requests.next())
        except OSError as exc:
            self.errors[type(exc).__name__] += 1
            if conn is not None:
                conn.close()
            return None
        done = time.perf_counter()
        self.answered += 1
        if self.record_from <= started < self.record_until:
            self.latencies_ms.append(round((done - started) * 1000, 3))
            self.statuses[status] += 1
        if close:
            conn.close()
            return None
        return conn

    async def closed_client(self) -> None:
        conn = None
        while (started := time.perf_counter()) < self.record_until:
            conn = await self.exchange(conn, started)
        if conn is not None:
            conn.close()

    async def open_request(self, due: float) -> None:
        conn = self.idle.pop() if self.idle else None
        if self.record_from <= due < self.record_until:
            self.send_lag_ms.append(round((time.perf_counter() - due) * 1000, 3))
        conn = await self.exchange(conn, due)
        if conn is not None:
            self.idle.append(conn)

    async def open_loop(self, rate: float, start: float) -> None:
        pending: set[asyncio.Task[None]] = set()
        for n in itertools.count():
            due = start + n / rate
            if due >= self.record_until:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self.open_request(due))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=30)
        for conn in self.idle:
            conn.close()


async def drive(args: argparse.Namespace) -> dict[str, object]:
    start = time.perf_counter() + 0.05
    record_from = start + args.warmup
    driver = Driver(args.port, args.token, record_from, record_from + args.duration)
    if args.mode == "closed":
        clients = [driver.closed_client() for _ in range(args.connections)]
        await asyncio.wait_for(asyncio.gather(*clients), args.warmup + args.duration + 60)
    else:
        await driver.open_loop(args.rate, start)
    finished = time.perf_counter()
    # Closed loop: answers per second of the window; open loop: the offered rate held.
    window = args.duration if args.mode == "open" else finished - record_from
    return {
        "mode": args.mode,
        "connections": args.connections,
        "rate": args.rate,
        "window_s": round(window, 3),
        "completed": len(driver.latencies_ms),
        "answered_in_all": driver.answered,
        "requests_per_s": round(len(driver.latencies_ms) / window, 1),
        "statuses": {str(k): v for k, v in sorted(driver.statuses.items())},
        "errors": dict(driver.errors),
        "latencies_ms": driver.latencies_ms,
        "send_lag_ms": driver.send_lag_ms,
        "driver_cpu_s": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 2),
        "driver_wall_s": round(finished - start, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HTTP load driver for POST /webhook")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["closed", "open"], default="closed")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rate", type=float, default=0, help="requests/s (open loop)")
    parser.add_argument("--duration", type=float, default=10, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1, help="seconds not recorded")
    parser.add_argument("--token", default="")
    args = parser.parse_args(argv)
    if args.mode == "open" and args.rate <= 0:
        parser.error("--mode open needs --rate")
    print(json.dumps(asyncio.run(drive(args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
