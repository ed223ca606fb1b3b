"""How long the garbage collector's full pass stops a webhook or worker process, before and
after the process freezes its start-up objects (`gc.freeze()`, as gunicorn.conf.py's
`post_worker_init` and worker.app do), and how often a full pass comes.

Each process kind is built in a fresh interpreter as it is in production: the webhook app
(`create_app()`, then 200 requests through it), and the Celery worker's app, tasks and
responder with a model loaded through `from_pretrained` (random weights in the
DialoGPT-small shape, built locally). In each, `gc.collect()` is timed three times
before and after the freeze; a full pass that Python starts on its own costs the same,
with every thread of the process stopped. Then 20,000 requests through the webhook app
(Flask's test client, real Redis) count the collections Python started by itself.

    python -m bench.gc_pauses [--requests 20000]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import (
    PYTHON,
    ROOT,
    WEBHOOK_TOKEN,
    Run,
    build_dialogpt_shape,
    conditions,
    markdown_table,
    save_results,
)
from common.heap import freeze_startup_objects


def full_pass_ms() -> list[float]:
    times = []
    for _ in range(3):
        started = time.perf_counter()
        gc.collect()
        times.append(round((time.perf_counter() - started) * 1000, 2))
    return times


def webhook_requests(count: int) -> Any:
    from webhook import create_app

    client = create_app().test_client()
    headers = {"X-Webhook-Token": WEBHOOK_TOKEN}
    for n in range(count):
        body = {"message_id": f"gc-{n}-{time.time_ns()}", "from": f"+5917{n % 1000:07d}",
                "text": "hola"}  # fmt: skip
        response = client.post("/webhook", json=body, headers=headers)
        assert response.status_code == 202, response.get_json()
    return client


def child(kind: str, requests: int) -> dict[str, Any]:
    """In a fresh interpreter: build the process's state, time full passes, freeze."""
    if kind == "webhook":
        webhook_requests(200)
        freeze = _gunicorn_post_worker_init
    else:
        import worker.tasks  # noqa: F401  (registered as in the worker)
        from worker import runtime
        from worker.model import get_model

        runtime.responder()
        get_model()  # what worker.app's start-up hooks load, before they freeze
        freeze = freeze_startup_objects  # as worker.app's start-up hooks call it
    result: dict[str, Any] = {"objects": len(gc.get_objects()), "before_ms": full_pass_ms()}
    freeze()
    result["frozen"] = gc.get_freeze_count()
    result["after_ms"] = full_pass_ms()
    if kind == "webhook":
        result["after_requests"] = collections_during(requests, frozen=True)
        gc.unfreeze()
        result["before_requests"] = collections_during(requests, frozen=False)
    return result


def _gunicorn_post_worker_init() -> None:
    namespace: dict[str, Any] = {}
    exec(compile((ROOT / "gunicorn.conf.py").read_text(), "gunicorn.conf.py", "exec"), namespace)
    namespace["post_worker_init"](None)


def collections_during(requests: int, frozen: bool) -> dict[str, Any]:
    """Collections Python starts by itself while the webhook answers `requests`."""
    durations: dict[int, list[float]] = defaultdict(list)
    started: list[float] = []

    def watch(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        else:
            durations[info["generation"]].append((time.perf_counter() - started.pop()) * 1000)

    gc.callbacks.append(watch)
    try:
        webhook_requests(requests)
    finally:
        gc.callbacks.remove(watch)
    return {f"gen{g}": {"count": len(v), "max_ms": round(max(v), 2), "total_ms": round(sum(v))}
            for g, v in sorted(durations.items())}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--child", choices=["webhook", "worker"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.requests)))
        return 0

    run = Run.new("gc")
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as directory:
            model, _ = build_dialogpt_shape(Path(directory) / "model")
            env = run.env(MODEL_NAME=str(model), LOG_LEVEL="WARNING", WORKER_METRICS_PORT="0")
            for kind in ("webhook", "worker"):
                done = subprocess.run(
                    [PYTHON, "-m", "bench.gc_pauses", "--child", kind, "--requests",
                     str(args.requests)],
                    cwd=ROOT, env=env, capture_output=True, text=True,
                )  # fmt: skip
                if done.returncode:
                    raise RuntimeError(f"{kind} child failed:\n{done.stderr[-3000:]}")
                results[kind] = json.loads(done.stdout.splitlines()[-1])
    finally:
        run.purge()
    print(markdown_table(["process", "objects", "full pass ms (3 times)", "frozen",
                          "full pass ms after freeze"], [
        [kind, r["objects"], ", ".join(map(str, r["before_ms"])), r["frozen"],
         ", ".join(map(str, r["after_ms"]))] for kind, r in results.items()
    ]))  # fmt: skip
    web = results["webhook"]
    for label in ("before_requests", "after_requests"):
        print(f"- webhook, {args.requests} requests, {label.split('_')[0]} the freeze: "
              f"{web[label]}")  # fmt: skip
    print(f"- {conditions()}")
    path = save_results("gc_pauses", {"requests": args.requests, **results})
    print(f"- results: {path.relative_to(path.parent.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
