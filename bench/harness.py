"""What the process benchmarks share: names and environment of a private run, starting and
stopping processes, Redis clean-up, /proc memory readings, percentiles, a callback
receiver, the DialoGPT-small-shaped model, and Markdown output."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PYTHON = sys.executable
# A database of its own keeps even kombu's global keys (`unacked`...) away from real data;
# everything the benchmarks write also carries a private prefix and queue name.
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
# The two apps the webhook benchmarks compare, as gunicorn app specs.
APPS = {"bare Flask (baseline)": "bench.bare_app:create_app()", "webhook": "webhook:create_app()"}
WEBHOOK_TOKEN = "bench-token"  # a throwaway credential for loopback runs


# --- A private run: names and environment ----------------------------------------------


@dataclass(frozen=True)
class Run:
    """Key prefix and queue that nothing else uses, and where this run's logs go."""

    name: str
    prefix: str
    queue: str
    logs: Path

    @classmethod
    def new(cls, kind: str) -> Run:
        unique = uuid.uuid4().hex[:8]
        logs = Path(os.environ.get("BENCH_LOG_DIR", f"/tmp/bench-{kind}-{unique}"))
        logs.mkdir(parents=True, exist_ok=True)
        return cls(kind, f"bench-{kind}-{unique}", f"bench-{kind}-{unique}", logs)

    def env(self, **overrides: str) -> dict[str, str]:
        """Production settings (token auth, JSON logs), no rate limit, this run's names."""
        env = {k: v for k, v in os.environ.items() if k.isupper()}
        env.update(
            REDIS_URL=REDIS_URL,
            KEY_PREFIX=self.prefix,
            TASK_QUEUE=self.queue,
            ENVIRONMENT="production",
            WEBHOOK_TOKEN=WEBHOOK_TOKEN,
            RATE_LIMIT_PER_MINUTE="0",
            N8N_CALLBACK_URL="http://127.0.0.1:9/unused",
            CALLBACK_SECRET="whsec_" + base64.b64encode(os.urandom(32)).decode(),
            WORKER_METRICS_PORT=str(free_port()),
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
        )
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(overrides)
        return env

    def purge(self) -> int:
        """Delete every key of this run: session keys, the queue and kombu's bindings."""
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        deleted = 0
        try:
            for pattern in (f"{self.prefix}:*", f"{self.queue}*", f"_kombu.binding*.{self.queue}"):
                batch = list(client.scan_iter(match=pattern, count=1000))
                for start in range(0, len(batch), 1000):
                    deleted += client.unlink(*batch[start : start + 1000])
            # kombu's binding expiry index outlives the workers; drop it once no binding is
            # left in the benchmarks' database (a live worker's would still be there).
            if not any(client.scan_iter(match="_kombu.binding.*", count=1000)):
                deleted += client.unlink("_kombu.binding_deadlines")
        finally:
            client.close()
        return deleted


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- Processes -------------------------------------------------------------------------


@contextlib.contextmanager
def process(command: Sequence[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Start `command` in its own process group, output to `log`; stop the group on exit."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(command), env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM the leader (a warm shutdown), then SIGKILL whatever is left of its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout}s:\n{log.read_text(errors='replace')}")


def http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def gunicorn_settings() -> dict[str, Any]:
    """Worker count, class and threads as gunicorn.conf.py sets them (gunicorn's defaults:
    1 sync worker, 1 thread)."""
    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    return {"workers": conf.get("workers", 1), "worker_class": conf.get("worker_class", "sync"),
            "threads": conf.get("threads", 1)}  # fmt: skip


def gunicorn_command(app: str, port: int) -> list[str]:
    """gunicorn with the production config file; only the bind address is ours."""
    return [PYTHON, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
            "--bind", f"127.0.0.1:{port}", app]  # fmt: skip


@contextlib.contextmanager
def gunicorn(app: str, run: Run, label: str, env: dict[str, str]) -> Iterator[tuple[int, int]]:
    """A running gunicorn serving `app`: yields (port, master pid) once /health or / answers."""
    port = free_port()
    log = run.logs / f"{label}.log"
    with process(gunicorn_command(app, port), env, log) as proc:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 60, label, log)
        workers = gunicorn_settings()["workers"]
        wait_until(lambda: len(children(proc.pid)) >= workers, 30, f"{label} workers", log)
        yield port, proc.pid


def celery_command(module: str, pool: str, concurrency: int, hostname: str) -> list[str]:
    """A worker as the Procfile starts one (`module` is `celery -A worker` or a stand-in)."""
    return [PYTHON, "-m", *module.split(), "worker", "--pool", pool,
            "--concurrency", str(concurrency), "--hostname", f"{hostname}@%h",
            "--loglevel", "INFO"]  # fmt: skip


def children(pid: int) -> list[int]:
    """Direct children of a process (every thread's list, as Linux keeps them per thread)."""
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return sorted(set(found))


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children(current)
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time used so far by these processes (all their threads)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def redis_server_pid() -> int | None:
    """The Redis server's pid when it runs on this machine (for its CPU time)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    return pid if Path(f"/proc/{pid}").exists() else None


def memory_mb(pid: int) -> dict[str, float | None]:
    """VmRSS from /proc/<pid>/status; from /proc/<pid>/smaps_rollup (where readable) Pss
    and USS (Private_Clean + Private_Dirty: what only this process holds), in MiB."""
    rss = pss = uss = None
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    with contextlib.suppress(OSError):
        rollup = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, _, value = line.partition(":")
            rollup[name] = int(value.split()[0]) / 1024
        pss = rollup.get("Pss")
        uss = rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)
    return {"rss_mb": rss, "pss_mb": pss, "uss_mb": uss}


def mapped_file_mb(pid: int, suffix: str) -> float:
    """Resident MiB of a process's mappings of files whose name ends with `suffix` (the
    model's weights file, when the loader maps it instead of copying it)."""
    resident, inside = 0.0, False
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                inside = line.rstrip().endswith(suffix)
            elif inside and first == "Rss:":
                resident += int(line.split()[1]) / 1024
    return resident


# --- Numbers and output ----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(values_ms: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values_ms),
        **{f"p{q}": round(percentile(values_ms, q), 2) for q in (50, 90, 99)},
        "max": round(max(values_ms), 2) if values_ms else float("nan"),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def conditions() -> str:
    """Load average and core count, to print next to every table."""
    load = Path("/proc/loadavg").read_text().split()[:3]
    return f"loadavg {' '.join(load)} on {os.cpu_count()} cores"


def cpu_description() -> str:
    """Which CPU a result came from: the VM's changes between sessions (BENCHMARKS.md,
    Machine), and `lscpu` names three different kinds alike "AMD EPYC"."""
    fields: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if not line.strip():
            break  # the first processor is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    if "avx512_bf16" in flags:
        simd += " with bf16"
    vendor, family, model = (fields.get(k, "?") for k in ("vendor_id", "cpu family", "model"))
    return f"{vendor} family {family} model {model} ({fields.get('model name', '?')}), {simd}"


def save_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    when = time.strftime("%Y-%m-%dT%H:%M:%S")
    data = {"conditions": conditions(), "cpu": cpu_description(), "at": when, **data}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


# --- n8n's side: the callback receiver -------------------------------------------------

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
_MAX_HEAD = 64 * 1024  # a request head larger than this is not a worker's callback


@dataclass
class CallbackReceiver:
    """Records when each reply arrives (perf_counter, this process's clock), by message id.

    Runs on `loop` (an asyncio loop in a thread of its own): coroutines on that loop await
    `arrival()`, other threads call `wait()`. Only the loop's thread writes the dicts."""

    loop: asyncio.AbstractEventLoop
    url: str = ""
    arrivals: dict[str, float] = field(default_factory=dict)
    bodies: dict[str, dict[str, Any]] = field(default_factory=dict)
    _waiters: dict[str, list[asyncio.Future[float]]] = field(default_factory=dict)

    def record(self, body: dict[str, Any], arrived: float) -> None:
        """On the loop: note the arrival and wake only the waiters for these ids."""
        for message_id in body.get("in_reply_to", []):
            self.arrivals[message_id] = arrived
            self.bodies[message_id] = body
            for waiter in self._waiters.pop(message_id, ()):
                if not waiter.done():
                    waiter.set_result(arrived)

    async def arrival(self, message_id: str, timeout: float = 30) -> float:
        """On the loop: when the reply to `message_id` arrived, waiting up to `timeout`."""
        if message_id in self.arrivals:
            return self.arrivals[message_id]
        waiter: asyncio.Future[float] = self.loop.create_future()
        self._waiters.setdefault(message_id, []).append(waiter)
        error = TimeoutError(f"no callback for {message_id} within {timeout}s")
        timer = self.loop.call_later(timeout, _fail, waiter, error)
        try:
            return await waiter
        finally:
            timer.cancel()
            waiting = self._waiters.get(message_id, [])
            if waiter in waiting:
                waiting.remove(waiter)
                if not waiting:
                    del self._waiters[message_id]

    def wait(self, message_id: str, timeout: float = 30) -> float:
        """From any other thread: `arrival()` on the receiver's loop."""
        future = asyncio.run_coroutine_threadsafe(self.arrival(message_id, timeout), self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def count(self) -> int:
        return len(self.arrivals)  # one read of a dict only the loop writes


def _fail(waiter: asyncio.Future[float], error: BaseException) -> None:
    if not waiter.done():
        waiter.set_exception(error)


class _CallbackProtocol(asyncio.Protocol):
    """One keep-alive connection from the worker: HTTP/1.1 requests with Content-Length
    bodies, possibly pipelined or split across reads, each answered 200 in order."""

    def __init__(self, receiver: CallbackReceiver, transports: set[asyncio.BaseTransport]):
        self.receiver = receiver
        self.transports = transports
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.transports.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transports.discard(self.transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        arrived = time.perf_counter()  # the read that completes a body is its arrival
        self.buffer += data
        while self.transport is not None and not self.transport.is_closing():
            while self.buffer.startswith(b"\r\n"):  # stray CRLF between requests
                del self.buffer[:2]
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > _MAX_HEAD:
                    self._refuse(b"431 Request Header Fields Too Large")
                return
            request_line, *lines = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "transfer-encoding" in headers:  # requests sends Content-Length for bytes
                self._refuse(b"501 Not Implemented")
                return
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                length = -1
            if length < 0:
                self._refuse(b"400 Bad Request")
                return
            start = end + 4
            if len(self.buffer) < start + length:
                return  # the rest of the body is still on its way
            body = bytes(self.buffer[start : start + length])
            del self.buffer[: start + length]
            method, _, rest = request_line.partition(" ")
            if method != "POST":
                self.transport.write(b"HTTP/1.1 405 Method Not Allowed\r\nAllow: POST\r\n"
                                     b"Content-Length: 0\r\n\r\n")  # fmt: skip
                continue
            try:
                self.receiver.record(json.loads(body or b"{}"), arrived)
            except ValueError:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                continue
            self.transport.write(_OK)
            connection = headers.get("connection", "").lower()
            if connection == "close" or (rest.endswith("HTTP/1.0") and connection != "keep-alive"):
                self.transport.close()

    def _refuse(self, status: bytes) -> None:
        """Answer and close: after a request it cannot frame, the stream is lost."""
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")  # fmt: skip
        self.transport.close()


@contextlib.contextmanager
def callback_receiver() -> Iterator[CallbackReceiver]:
    """An HTTP/1.1 server with keep-alive (as n8n's is) that answers 200, on an asyncio loop
    in a thread of its own: one thread serves every connection, and a callback wakes only
    its waiter, so the receiver costs little of the CPU it shares with the system under
    test. Coroutines that await `arrival()` run on `receiver.loop`."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="callback-receiver", daemon=True)
    thread.start()
    receiver = CallbackReceiver(loop)
    transports: set[asyncio.BaseTransport] = set()

    async def serve() -> asyncio.Server:
        return await loop.create_server(
            lambda: _CallbackProtocol(receiver, transports), "127.0.0.1", 0
        )

    async def shut(server: asyncio.Server) -> None:
        server.close()
        for transport in list(transports):
            transport.close()
        await server.wait_closed()
        await asyncio.sleep(0)  # let the transports' connection_lost run

    try:
        server = asyncio.run_coroutine_threadsafe(serve(), loop).result()
        receiver.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/n8n/reply"
        try:
            yield receiver
        finally:
            asyncio.run_coroutine_threadsafe(shut(server), loop).result(timeout=10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()


# --- The model -------------------------------------------------------------------------

# GPT-2 configs of the two DialoGPT sizes, with GPT-2's output layer and positions: random
# weights of these shapes cost exactly what the real ones cost per token.
DIALOGPT_SHAPES = {
    "small": {"layers": 12, "width": 768, "heads": 12, "context": 1024, "vocab_size": 50257},
    "medium": {"layers": 24, "width": 1024, "heads": 16, "context": 1024, "vocab_size": 50257},
}


def build_dialogpt_shape(directory: Path, shape: str = "small") -> tuple[Path, int]:
    """Random weights in a DialoGPT size's exact shape, and the tiny offline tokenizer
    (worker.tiny_model); returns the directory and the parameter count."""
    from worker.tiny_model import build_tiny_model

    path = build_tiny_model(directory, **DIALOGPT_SHAPES[shape])
    config = json.loads((path / "config.json").read_text())
    width, vocab, context = config["n_embd"], config["vocab_size"], config["n_positions"]
    # GPT-2: embeddings (tied with the output layer) + per layer 12*w^2 + 13*w + final LN.
    params = vocab * width + context * width + config["n_layer"] * (12 * width**2 + 13 * width)
    return path, params + 2 * width


# --- The load driver, in its own process ------------------------------------------------


def load(port: int, duration: float, *, connections: int = 16, rate: float = 0,
         warmup: float = 1) -> dict[str, Any]:  # fmt: skip
    """Run bench.loadgen against `port`: closed loop, or open loop when `rate` is given."""
    command = [PYTHON, "-m", "bench.loadgen", "--port", str(port), "--duration", str(duration),
               "--warmup", str(warmup), "--connections", str(connections),
               "--token", WEBHOOK_TOKEN]  # fmt: skip
    if rate:
        command += ["--mode", "open", "--rate", f"{rate:.1f}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


# --- Profiles (py-spy, from requirements-dev.txt) --------------------------------------


@contextlib.contextmanager
def profiled(targets: dict[str, int], out_dir: Path, rate: int = 200) -> Iterator[dict[str, Path]]:
    """Sample each pid (and its subprocesses) with py-spy while the block runs; only
    threads holding the GIL are sampled, so the profile shows where Python spends CPU,
    not where it waits for Redis or a socket."""
    py_spy = Path(PYTHON).parent / "py-spy"
    paths = {name: out_dir / f"profile-{name}.raw" for name in targets}
    spies = []
    for name, pid in targets.items():
        command = [str(py_spy), "record", "--format", "raw", "--nonblocking", "--subprocesses",
                   "--gil", "--rate", str(rate), "--pid", str(pid),
                   "--output", str(paths[name])]  # fmt: skip
        out = subprocess.DEVNULL
        spies.append(subprocess.Popen(command, stdout=out, stderr=out))
    time.sleep(0.5)  # attached
    try:
        yield paths
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for spy in spies:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(timeout=30)


# Frames of process start-up and main loops, on the stack of nearly every sample.
PLUMBING = ("<frozen runpy>", "threading.py", "concurrent/futures/", "click/", "billiard/",
            "gunicorn/", "celery/bin/", "celery/bootsteps.py", "celery/concurrency/",
            "celery/worker/worker.py", "bench/instant_worker.py", "celery/app/trace.py",
            "celery/app/autoretry.py")  # fmt: skip


def hot_frames(raw: Path, top: int = 25, below: float = 90.0) -> list[tuple[float, str]]:
    """Functions by share of samples they were on the stack in (inclusive), highest first,
    leaving out process start-up and main-loop frames (PLUMBING)."""
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue  # a wrapped line of a long process title
        samples = int(count)
        total += samples
        names = set()
        for frame in stack.split(";"):
            function, _, where = frame.partition(" (")
            where = where.rstrip(")").rsplit(":", 1)[0].split("site-packages/")[-1]
            names.add(f"{function} ({where.replace(str(ROOT) + '/', '')})")
        for name in names:
            inclusive[name] = inclusive.get(name, 0) + samples
    shares = [
        (100 * n / total, name)
        for name, n in inclusive.items()
        if total and not name.startswith("process ") and not any(p in name for p in PLUMBING)
    ]
    return sorted((s for s in shares if s[0] < below), reverse=True)[:top]
