"""Memory: RSS and PSS of the webhook's gunicorn processes, and of a Celery worker holding a
DialoGPT-small-sized model, idle and with tasks in flight.

- Webhook: gunicorn with gunicorn.conf.py, the real app and the bare baseline, read after a
  few seconds of load (bench.loadgen). Target: each webhook process < 100 MB RSS.
- Worker: random weights in DialoGPT-small's exact shape (124M parameters, ~500 MB in
  float32) built locally, loaded by the real worker through MODEL_NAME. `--pool threads
  --concurrency 16` with 16 replies in flight against idle: the threads share one copy, so
  RSS must not grow by anything like 16 copies. Then `--pool prefork --concurrency 2`: one
  copy per child.
RSS is /proc/<pid>/status VmRSS; PSS (/proc/<pid>/smaps_rollup) splits pages shared between
processes (a prefork parent and its children, or two processes mapping the same weights
file) among them, so PSS adds up across processes; USS is what one process holds alone.
All in MiB.

    python -m bench.memory [--skip-worker]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from bench.harness import (
    APPS,
    REDIS_URL,
    WEBHOOK_TOKEN,
    CallbackReceiver,
    Run,
    build_dialogpt_shape,
    callback_receiver,
    celery_command,
    children,
    conditions,
    gunicorn,
    load,
    mapped_file_mb,
    markdown_table,
    memory_mb,
    process,
    process_tree,
    save_results,
    wait_until,
)

IN_FLIGHT = 16
REPLY_TOKENS = 24


def gunicorn_rows(label: str, master: int) -> list[dict[str, Any]]:
    rows = [{"app": label, "process": "gunicorn master", **memory_mb(master)}]
    for n, pid in enumerate(children(master), 1):
        rows.append({"app": label, "process": f"gunicorn worker {n}", **memory_mb(pid)})
    return rows


def measure_webhook(run: Run, env: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for label, app in APPS.items():
        with gunicorn(app, run, label.split()[0], env) as (port, master):
            load(port, 3, connections=8)  # warm-up: every worker has served requests
            time.sleep(0.5)
            rows += gunicorn_rows(label, master)
    return rows


def post(port: int, message_id: str, session: str) -> None:
    body = json.dumps({"message_id": message_id, "from": session, "text": "Hola, ¿qué tal?"})
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/webhook", data=body.encode(), method="POST",
        headers={"Content-Type": "application/json", "X-Webhook-Token": WEBHOOK_TOKEN},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202, response.status


def tree_memory(pid: int) -> dict[int, dict[str, float | None]]:
    return {p: memory_mb(p) for p in process_tree(pid)}


def total(snapshot: dict[int, dict[str, float | None]], key: str) -> float:
    return sum(m[key] or 0 for m in snapshot.values())


def measure_worker(
    pool: str, concurrency: int, run: Run, env: dict[str, str], port: int,
    receiver: CallbackReceiver,
) -> dict[str, Any]:  # fmt: skip
    """Idle after the model loaded and one warm-up reply; peak while IN_FLIGHT replies run."""
    log = run.logs / f"worker-{pool}.log"
    command = celery_command("celery -A worker", pool, concurrency, f"bench-mem-{pool}")
    queue = redis.Redis.from_url(REDIS_URL)
    copies = concurrency if pool == "prefork" else 1
    tag = f"{pool}{int(time.time()) % 100000}"
    with process(command, env, log) as worker:
        loaded = lambda: log.read_text(errors="replace").count("model loaded") >= copies  # noqa: E731
        wait_until(loaded, 300, f"{pool} worker model", log)
        # Warm-up: a reply from every process that generates (first use touches every
        # weight page and allocates torch's buffers).
        warm = [f"wamid.{tag}.warm{n}" for n in range(2 * copies)]
        for n, message_id in enumerate(warm):
            post(port, message_id, f"+591{tag}w{n}")
        for message_id in warm:
            receiver.wait(message_id, timeout=300)
        time.sleep(1)
        idle = tree_memory(worker.pid)
        for pid, numbers in idle.items():
            numbers["weights_file_mapped_mb"] = mapped_file_mb(pid, ".safetensors")

        peak, in_flight, posted, stop = dict(idle), 0, 0, threading.Event()

        def sample() -> None:
            nonlocal peak, in_flight
            while not stop.is_set():
                now = tree_memory(worker.pid)
                if total(now, "rss_mb") > total(peak, "rss_mb"):
                    peak = now
                waiting = queue.llen(run.queue)
                in_flight = max(in_flight, posted - waiting - (receiver.count() - before))
                time.sleep(0.05)

        before = receiver.count()
        sampler = threading.Thread(target=sample)
        sampler.start()
        ids = [f"wamid.{tag}.{n}" for n in range(IN_FLIGHT)]
        for n, message_id in enumerate(ids):
            post(port, message_id, f"+591{tag}{n}")
            posted += 1
        started = time.perf_counter()
        for message_id in ids:
            receiver.wait(message_id, timeout=600)
        seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
        time.sleep(1)
        after = tree_memory(worker.pid)
    queue.close()
    names = {worker.pid: "main process"} | {
        pid: f"child {n}" for n, pid in enumerate(sorted(set(idle) - {worker.pid}), 1)
    }
    return {
        "pool": f"{pool} x{concurrency}", "in_flight_max": in_flight, "reply_seconds": seconds,
        "processes": [
            {"process": names.get(pid, str(pid)), "idle": idle[pid], "peak": peak.get(pid),
             "after": after.get(pid)} for pid in idle
        ],
        "conditions": conditions(),
    }  # fmt: skip


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-worker", action="store_true", help="webhook only")
    args = parser.parse_args(argv)
    run = Run.new("memory")
    print(f"logs in {run.logs}")
    workers: list[dict[str, Any]] = []
    params = 0
    try:
        env = run.env()
        webhook_rows = measure_webhook(run, env)
        webhook_load = conditions()
        run.purge()  # the warm-up's tasks must not reach the worker below
        if not args.skip_worker:
            with tempfile.TemporaryDirectory(prefix="bench-dialogpt-small-") as tmp:
                model_dir, params = build_dialogpt_shape(Path(tmp) / "model")
                with callback_receiver() as receiver:
                    env = run.env(
                        N8N_CALLBACK_URL=receiver.url, MODEL_NAME=str(model_dir),
                        MAX_NEW_TOKENS=str(REPLY_TOKENS), MIN_NEW_TOKENS=str(REPLY_TOKENS),
                        DO_SAMPLE="false", WORKER_START_TIMEOUT_SECONDS="600",
                    )  # fmt: skip
                    with gunicorn("webhook:create_app()", run, "webhook-w", env) as (port, _):
                        for pool, concurrency in (("threads", IN_FLIGHT), ("prefork", 2)):
                            workers.append(
                                measure_worker(pool, concurrency, run, env, port, receiver)
                            )
    finally:
        purged = run.purge()

    print()
    print(f"Webhook processes after warm-up ({webhook_load}):")
    print()
    print(markdown_table(["app", "process", "RSS MB", "PSS MB", "USS MB"], [
        [r["app"], r["process"], fmt(r["rss_mb"]), fmt(r["pss_mb"]), fmt(r["uss_mb"])]
        for r in webhook_rows
    ]))  # fmt: skip
    web = [r for r in webhook_rows if r["app"] == "webhook"]
    worst = max(r["rss_mb"] or 0 for r in web)
    print()
    print(f"- largest webhook process: **{worst:.0f} MB RSS** (target < 100 MB); all webhook "
          f"processes together: {sum(r['pss_mb'] or 0 for r in web):.0f} MB PSS")  # fmt: skip
    if workers:
        weights = params * 4 / 2**20
        print()
        print(f"Celery worker with a DialoGPT-small-shaped model ({params / 1e6:.0f}M parameters, "
              f"{weights:.0f} MB of float32 weights), {IN_FLIGHT} replies of {REPLY_TOKENS} "
              "tokens:")  # fmt: skip
        print()
        rows = []
        for w in workers:
            for p in w["processes"]:
                idle, peak, after = p["idle"], p["peak"] or {}, p["after"] or {}
                rows.append([w["pool"], p["process"], fmt(idle["rss_mb"]),
                             fmt(peak.get("rss_mb")), fmt(after.get("rss_mb")),
                             fmt(idle["pss_mb"]), fmt(peak.get("pss_mb")),
                             fmt(idle["uss_mb"]), fmt(peak.get("uss_mb")),
                             fmt(idle["weights_file_mapped_mb"])])  # fmt: skip
        headers = ["pool", "process", "RSS idle", "RSS peak (in flight)", "RSS after",
                   "PSS idle", "PSS peak", "USS idle", "USS peak",
                   "weights file mapped"]  # fmt: skip
        print(markdown_table(headers, rows))
        print()
        for w in workers:
            idle = sum(p["idle"]["rss_mb"] or 0 for p in w["processes"])
            peak = sum((p["peak"] or {}).get("rss_mb") or 0 for p in w["processes"])
            print(f"- {w['pool']}: {w['in_flight_max']} replies in flight at most; RSS "
                  f"{idle:.0f} MB idle -> {peak:.0f} MB peak (+{peak - idle:.0f} MB; one more "
                  f"model copy would be +{weights:.0f} MB); {w['reply_seconds']:.1f} s for the "
                  f"{IN_FLIGHT} replies; {w['conditions']}")  # fmt: skip
    print(f"- {purged} Redis keys purged")
    path = save_results("memory", {"webhook": webhook_rows, "workers": workers,
                                   "model_parameters": params})  # fmt: skip
    print(f"- results: {path.relative_to(path.parent.parent.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
