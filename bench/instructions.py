"""Instructions per webhook request and per worker reply round, counted by valgrind: a
figure the machine's speed does not move.

Requests/s on these 2 shared cores drift by 20% between runs minutes apart, and the
machine itself changes between sessions (BENCHMARKS.md, Machine), which hides any change
worth less than that. Callgrind counts the instructions a process executes: the same code
and inputs give the same count to within ~1%, however busy the machine is. Each app runs
in-process, its WSGI callable driven with the load driver's request (same body, token and
headers) and a fresh message id per request; the webhook talks to the real Redis. The
count covers that Python process only: not Redis, not the kernel's side of system calls,
and not gunicorn's HTTP handling (the same for both apps). It is what the app itself
costs per request, the part a change to the app can move.

The worker's reply round is counted the same way: `Responder.answer` in-process, as
`bench.reply_round` times it (the responder a worker process builds, an instant model,
full histories, signed callbacks to a receiver, here in the parent process so that its
instructions are not counted). Each round needs a message accepted first; a second pair
of runs accepts the same messages without answering them, and its count is subtracted.
A task of two rounds (the second message arriving while the first reply is made, as for
most messages of back-to-back conversations) is counted the same way against two accepts.

Each count comes from two runs under callgrind, one with `--warmup` requests (or rounds)
and one with `--warmup` plus `--requests`; the difference over `--requests` leaves out
start-up and first-request work.

    python -m bench.instructions [--requests 200] [--variant python-redis-parser]
                                 [--skip-worker]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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

from bench.harness import (
    APPS,
    PYTHON,
    ROOT,
    WEBHOOK_TOKEN,
    Run,
    callback_receiver,
    markdown_table,
    save_results,
)
from bench.loadgen import BODY
from bench.variants import python_redis_protocol

# Variants to count beside the code as it is, by --variant name: the webhook's as gunicorn
# app specs, the worker's as context managers its responder is built in.
VARIANTS = {
    "python-redis-parser": "bench.variants:webhook_with_python_redis_parser()",
}
WORKER_VARIANTS = {"python-redis-parser": python_redis_protocol}


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


def _log_to_nowhere() -> None:
    """Log lines are formatted and written as in production (INFO, JSON), to /dev/null."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(open(os.devnull, "w"))  # noqa: SIM115 (lives as long as the app)


def drive(spec: str, requests: int, run_name: str) -> None:
    """Child: load the app as gunicorn would and send it `requests` requests in-process."""
    from gunicorn.util import import_app

    app = import_app(spec)
    _log_to_nowhere()
    statuses: list[str] = []

    def start_response(status: str, headers: object, exc_info: object = None) -> None:
        statuses.append(status)

    for n in range(requests):
        body = (BODY % (run_name, n, n)).encode()
        b"".join(app(_environ(body), start_response))
        if not statuses[-1].startswith("202"):
            raise SystemExit(f"request {n}: {statuses[-1]}, expected 202")


ACCEPT_ONLY = "accept-only"  # the worker child's mode that accepts without answering
# A task of two rounds: its second message arrives while the first reply is being made
# (back-to-back conversations answer about two thirds of their messages so, without a
# task of their own). Counted against two accepts without answers.
TWO_ROUNDS, TWO_ACCEPTS = "two-rounds", "two-accepts"
ANSWERS = {"answer": 1, ACCEPT_ONLY: 0, TWO_ROUNDS: 2, TWO_ACCEPTS: 0}


def drive_worker(mode: str, rounds: int, run_name: str, variant: str = "") -> None:
    """Child: reply tasks (or only their accepts) for 8 sessions with full histories."""
    from bench.reply_round import REPLY, accept_message, instant_responder
    from common.logging_setup import configure_logging
    from common.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_level, settings.effective_log_format, task_ids=True)
    _log_to_nowhere()
    with WORKER_VARIANTS.get(variant, contextlib.nullcontext)():
        responder = instant_responder()
    sessions = [f"{run_name}-{n}" for n in range(8)]
    sent = 0
    arriving: list[str] = []  # a session whose next message arrives during generation

    def accept(session: str) -> None:
        nonlocal sent
        sent += 1
        accept_message(responder, session, f"wamid.{run_name}.{sent}")

    def generate(turns: object) -> str:
        while arriving:
            accept(arriving.pop())
        return REPLY

    responder = dataclasses.replace(responder, generate=generate)

    def one_task(session: str, mode: str = "answer") -> None:
        accept(session)
        if mode == TWO_ROUNDS:
            arriving.append(session)
        elif mode == TWO_ACCEPTS:
            accept(session)
        if ANSWERS[mode] and responder.answer(session) != ANSWERS[mode]:
            raise SystemExit(f"task {sent} did not make {ANSWERS[mode]} replies")

    for _ in range(settings.max_history_messages // 2 + 2):  # full histories
        for session in sessions:
            one_task(session)
    for n in range(rounds):
        one_task(sessions[n % len(sessions)], mode)


def count(spec: str, requests: int, env: dict[str, str], run_name: str) -> int:
    """Instructions callgrind counted in a child that sent `requests` requests (`spec`: an
    app, or `worker:<mode>`)."""
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
    parser.add_argument("--skip-worker", action="store_true", help="webhook requests only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--run-name", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.child.startswith("worker:"):
            _, mode, variant = args.child.split(":")
            drive_worker(mode, args.requests, args.run_name, variant)
        else:
            drive(args.child, args.requests, args.run_name)
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")

    run = Run.new("instructions")
    targets = {**APPS, **{f"webhook, {name}": VARIANTS[name] for name in args.variant}}
    counts: dict[str, int] = {}
    worker: dict[str, int] = {}
    try:
        with callback_receiver() as receiver:
            env = run.env(N8N_CALLBACK_URL=receiver.url)
            for i, (name, spec) in enumerate(targets.items()):
                counts[name] = per_request(spec, args, env, f"{run.prefix}-{i}")
                print(f"  {name}: {counts[name]:,} instructions per request", flush=True)
            # Accepts without answers pile up; the inbox's cap would refuse them.
            worker_env = {**env, "MAX_PENDING_PER_SESSION": str(10 * (args.warmup + args.requests))}
            worker_variants = [""] + [v for v in args.variant if v in WORKER_VARIANTS]
            for variant in [] if args.skip_worker else worker_variants:
                for mode in ANSWERS:
                    name = f"{mode}, {variant}" if variant else mode
                    tag = f"{run.prefix}-{mode}-{variant}"
                    spec = f"worker:{mode}:{variant}"
                    worker[name] = per_request(spec, args, worker_env, tag)
                    print(f"  worker, {name}: {worker[name]:,} instructions per round", flush=True)
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
    for variant in sorted({name.partition(", ")[2] for name in worker}):
        suffix = f", {variant}" if variant else ""
        round_only = worker[f"answer{suffix}"] - worker[f"{ACCEPT_ONLY}{suffix}"]
        worker[f"reply round{suffix}"] = round_only
        print(f"- worker{suffix}: **{round_only:,}** instructions per reply round (full history, "
              f"signed callback), after subtracting the "
              f"{worker[f'{ACCEPT_ONLY}{suffix}']:,} of its message's accept")  # fmt: skip
        two = worker[f"{TWO_ROUNDS}{suffix}"] - worker[f"{TWO_ACCEPTS}{suffix}"]
        worker[f"task of two rounds{suffix}"] = two
        print(f"- worker{suffix}: **{two:,}** instructions per task of two rounds (the second "
              f"message arriving during the first generation), after subtracting the "
              f"{worker[f'{TWO_ACCEPTS}{suffix}']:,} of its two accepts")  # fmt: skip
    path = save_results("instructions", {"requests": args.requests, "warmup": args.warmup,
                                         "instructions_per_request": counts,
                                         "worker_instructions_per_round": worker})  # fmt: skip
    print(f"- results: {path.relative_to(path.parent.parent.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
