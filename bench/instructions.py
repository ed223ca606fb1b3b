"""Instructions per webhook request, counted by valgrind: a figure the machine's speed
does not move.

Requests/s on these 2 shared cores drift by 20% between runs minutes apart, and the
machine itself changes between sessions (BENCHMARKS.md, Machine), which hides any change
worth less than that. Callgrind counts the instructions a process executes: the same code
and inputs give the same count to within ~1%, however busy the machine is. Each app runs
in-process, its WSGI callable driven with the load driver's request (same body, token and
headers) and a fresh message id per request; the webhook talks to the real Redis. The
count covers that Python process only: not Redis, not the kernel's side of system calls,
and not gunicorn's HTTP handling (the same for both apps). It is what the app itself
costs per request, the part a change to the app can move.

Each target runs twice under callgrind, with `--warmup` requests and with `--warmup` plus
`--requests`; the difference over `--requests` leaves out start-up and first-request work.

    python -m bench.instructions [--requests 200] [--variant python-redis-parser]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.harness import APPS, PYTHON, ROOT, WEBHOOK_TOKEN, Run, markdown_table, save_results
from bench.loadgen import BODY

# Webhook variants (gunicorn app specs) to count beside the two apps, by --variant name.
VARIANTS = {
    "python-redis-parser": "bench.variants:webhook_with_python_redis_parser()",
}


def _environ(body: bytes) -> dict[str, Any]:
    """What gunicorn hands the app for the load driver's request."""
    return {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/webhook",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1:8000",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)),
        "HTTP_X_WEBHOOK_TOKEN": WEBHOOK_TOKEN,
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def drive(spec: str, requests: int, run_name: str) -> None:
    """Child: load the app as gunicorn would and send it `requests` requests in-process."""
    from gunicorn.util import import_app

    app = import_app(spec)
    # The access lines go where gunicorn's stderr would go, but not to the terminal.
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(open(os.devnull, "w"))  # noqa: SIM115 (lives as long as the app)
    statuses: list[str] = []

    def start_response(status: str, headers: object, exc_info: object = None) -> None:
        statuses.append(status)

    for n in range(requests):
        body = (BODY % (run_name, n, n)).encode()
        b"".join(app(_environ(body), start_response))
        if not statuses[-1].startswith("202"):
            raise SystemExit(f"request {n}: {statuses[-1]}, expected 202")


def count(spec: str, requests: int, env: dict[str, str], run_name: str) -> int:
    """Instructions callgrind counted in a child that sent `requests` requests."""
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", PYTHON,
               "-m", "bench.instructions", "--child", spec, "--requests", str(requests),
               "--run-name", run_name]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{spec} with {requests} requests failed:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def per_request(spec: str, args: argparse.Namespace, env: dict[str, str], tag: str) -> int:
    """Both runs side by side (2 cores), each with its own message ids."""
    with ThreadPoolExecutor(2) as pool:
        short = pool.submit(count, spec, args.warmup, env, f"{tag}-short")
        long = pool.submit(count, spec, args.warmup + args.requests, env, f"{tag}-long")
        return round((long.result() - short.result()) / args.requests)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--variant", nargs="*", default=[], choices=sorted(VARIANTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--run-name", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        drive(args.child, args.requests, args.run_name)
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")

    run = Run.new("instructions")
    env = run.env()
    targets = {**APPS, **{f"webhook, {name}": VARIANTS[name] for name in args.variant}}
    counts: dict[str, int] = {}
    try:
        for i, (name, spec) in enumerate(targets.items()):
            counts[name] = per_request(spec, args, env, f"{run.prefix}-{i}")
            print(f"  {name}: {counts[name]:,} instructions per request", flush=True)
    finally:
        purged = run.purge()
    bare = counts["bare Flask (baseline)"]
    rows = [[name, f"{n:,}", f"{n / bare:.2f}", f"{n - bare:+,}"] for name, n in counts.items()]
    print()
    headers = ["app", "instructions per request", "relative to bare", "beyond bare"]
    print(markdown_table(headers, rows))
    print()
    print(f"- {args.requests} requests after {args.warmup} of warm-up, in-process (no gunicorn); "
          f"{purged} Redis keys purged")  # fmt: skip
    path = save_results("instructions", {"requests": args.requests, "warmup": args.warmup,
                                         "instructions_per_request": counts})  # fmt: skip
    print(f"- results: {path.relative_to(path.parent.parent.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
