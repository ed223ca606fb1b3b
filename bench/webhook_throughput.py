"""Webhook throughput and latency: the real webhook against a bare Flask app, same gunicorn.

Both run under gunicorn with gunicorn.conf.py (same worker count and class), production
settings (token auth, JSON logs at INFO), rate limit off, a private key prefix and queue,
and no Celery worker: tasks pile up in the private queue and are purged at the end. The
load driver (bench.loadgen) is a second process on loopback.

1. Saturation: a closed loop of `--connections` connections, rounds alternating between
   the two apps so that background noise hits both alike. The ratio is given two ways:
   pooled (all the webhook's rounds against all the bare app's) and as the median of each
   webhook round against the bare round just before it. These VMs change speed by up to
   2x within a minute; a slow stretch that falls on one round moves the pooled ratio, not
   the median of the pairs (BENCHMARKS.md, section 1).
2. An open loop at half the bare app's saturated rate, for both apps.
3. An open loop at half the webhook's own saturated rate.
Targets: webhook >= 50% of the bare app's requests/s; p99 < 25 ms at that half rate.
`--experiments` then measures webhook variants (see EXPERIMENTS) against the webhook.

    python -m bench.webhook_throughput [--duration 10] [--connections 16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import redis

from bench.harness import (
    APPS,
    REDIS_URL,
    Run,
    children,
    conditions,
    cpu_seconds,
    gunicorn,
    gunicorn_settings,
    latency_summary,
    load,
    markdown_table,
    process_tree,
    redis_server_pid,
    save_results,
)


def combine(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several rounds of the same load as one: total answers over total measured time."""
    latencies = [x for part in parts for x in part["latencies_ms"]]
    lag = [x for part in parts for x in part["send_lag_ms"]]
    window = sum(part["window_s"] for part in parts)
    statuses: dict[str, int] = {}
    for part in parts:
        for status, count in part["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    # max(1, ...): a server that answered nothing (it happened once, after the open loop
    # it could not keep up with) still gets its row, with 0 req/s and its errors.
    answered = max(1, sum(part["answered_in_all"] for part in parts))
    return {
        "requests_per_s": round(len(latencies) / window, 1),
        "cpu_ms_per_request": {
            name: round(1000 * sum(part[f"{name}_cpu_s"] for part in parts) / answered, 2)
            for name in ("gunicorn", "redis")
        },
        "latency_ms": latency_summary(latencies),
        "send_lag_ms": latency_summary(lag) if lag else None,
        "statuses": statuses,
        "errors": sum(sum(part["errors"].values()) for part in parts),
        "rounds": [
            {"requests_per_s": p["requests_per_s"], "worker_cpu_s": p["worker_cpu_s"]}
            for p in parts
        ],
        "driver_cpu_percent": round(
            100 * sum(p["driver_cpu_s"] for p in parts) / sum(p["driver_wall_s"] for p in parts)
        ),
    }


def row(app: str, load_name: str, result: dict[str, Any]) -> list[object]:
    lat = result["latency_ms"]
    statuses = ", ".join(f"{k}: {v}" for k, v in result["statuses"].items())
    cpu = result["cpu_ms_per_request"]
    return [app, load_name, result["requests_per_s"], lat["p50"], lat["p99"], lat["max"],
            cpu["gunicorn"], cpu["redis"], statuses, result["errors"]]  # fmt: skip


# Experiments (--experiments): the webhook with one thing changed, against the unchanged
# webhook in alternating rounds. (gunicorn app spec, environment overrides.) Each undoes one
# of this release's changes, to show what it bought; two keep the run under 3 minutes.
EXPERIMENTS = {
    # Each undoes one of this afternoon's changes, or tries a setting (bench/HISTORY.md, section 1).
    "pure-Python Redis parser (before hiredis)": (
        "bench.variants:webhook_with_python_redis_parser()",
        {},
    ),
    "two log lines per message (before)": ("bench.variants:webhook_with_two_log_lines()", {}),
    "4 sync workers (WEB_CONCURRENCY=4)": (APPS["webhook"], {"WEB_CONCURRENCY": "4"}),
}


def measured_load(port: int, master: int, duration: float, **options: Any) -> dict[str, Any]:
    """bench.loadgen's result plus the CPU time gunicorn (master and workers) and Redis used,
    and each gunicorn worker's own: kept-alive connections stay with the worker that
    accepted them, which can be one worker only."""
    redis_pid = redis_server_pid()
    workers = children(master)
    servers = {"gunicorn": process_tree(master), "redis": [redis_pid] if redis_pid else []}
    before = {name: cpu_seconds(pids) for name, pids in servers.items()}
    before_each = [cpu_seconds([pid]) for pid in workers]
    result = load(port, duration, **options)
    for name, pids in servers.items():
        result[f"{name}_cpu_s"] = cpu_seconds(pids) - before[name]
    result["worker_cpu_s"] = [
        round(cpu_seconds([pid]) - b, 2) for pid, b in zip(workers, before_each, strict=True)
    ]
    return result


def settle(master: int, timeout: float = 120) -> float:
    """Wait until gunicorn is idle; returns the seconds waited. After an open loop the
    server could not keep up with, requests whose client gave up may still be queued (a
    gthread worker accepts connections beyond its threads); they must not land in the next
    measurement."""
    tree, started = process_tree(master), time.monotonic()
    while time.monotonic() - started < timeout:
        before = cpu_seconds(tree)
        time.sleep(0.5)
        if cpu_seconds(tree) - before < 0.02:  # under 4% of a core
            break
    return round(time.monotonic() - started, 1)


def saturate(
    targets: dict[str, tuple[int, int]], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Closed-loop rounds alternating between the apps; each app's rounds combined."""
    rounds: dict[str, list[dict[str, Any]]] = {app: [] for app in targets}
    for _ in range(args.rounds):
        for app, (port, master) in targets.items():
            duration = args.duration / args.rounds
            part = measured_load(port, master, duration, connections=args.connections)
            rounds[app].append(part)
            split = " / ".join(f"{s:.1f}" for s in part["worker_cpu_s"])
            print(f"  {app}: {part['requests_per_s']} req/s (CPU s per worker: {split})",
                  flush=True)  # fmt: skip
    return {app: combine(parts) for app, parts in rounds.items()}


def experiments(run: Run, webhook: tuple[int, int], args: argparse.Namespace) -> list[list[object]]:
    rows = []
    for name, (app, overrides) in EXPERIMENTS.items():
        label = "exp-" + "".join(c if c.isalnum() else "-" for c in name)
        with gunicorn(app, run, label, run.env(**overrides)) as target:
            settle(target[1])  # every worker has loaded the app
            got = saturate({"webhook": webhook, name: target}, args)
        run.purge()
        base, variant = got["webhook"], got[name]
        ratio = variant["requests_per_s"] / base["requests_per_s"]
        rows.append([name, base["requests_per_s"], variant["requests_per_s"], f"{ratio:.2f}x",
                     variant["latency_ms"]["p50"], variant["latency_ms"]["p99"],
                     base["cpu_ms_per_request"]["gunicorn"],
                     variant["cpu_ms_per_request"]["gunicorn"],
                     rounds(base), rounds(variant)])  # fmt: skip
    return rows


def pair_ratios(webhook: dict[str, Any], bare: dict[str, Any]) -> list[float]:
    """Each webhook round's req/s over the bare round run just before it."""
    return [
        w["requests_per_s"] / b["requests_per_s"]
        for w, b in zip(webhook["rounds"], bare["rounds"], strict=True)
    ]


def rounds(result: dict[str, Any]) -> str:
    """Each round's req/s: a gthread round whose connections all went to one worker shows."""
    return " / ".join(f"{r['requests_per_s']:.0f}" for r in result["rounds"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per app and load")
    parser.add_argument("--rounds", type=int, default=6, help="saturation rounds per app")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--experiments", action="store_true", help="also measure webhook variants (slow)"
    )
    args = parser.parse_args(argv)

    run = Run.new("throughput")
    env = run.env()
    gconf = gunicorn_settings()
    print(f"gunicorn: {gconf['workers']} {gconf['worker_class']} workers x {gconf['threads']} "
          f"threads; logs in {run.logs}")  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    purged = 0
    try:
        with (
            gunicorn(APPS["bare Flask (baseline)"], run, "bare", env) as bare,
            gunicorn(APPS["webhook"], run, "webhook", env) as webhook,
        ):
            targets = {"bare Flask (baseline)": bare, "webhook": webhook}
            for app, result in saturate(targets, args).items():
                results[f"{app}|saturation"] = result
            bare_rate = results["bare Flask (baseline)|saturation"]["requests_per_s"]
            half = bare_rate / 2
            for app, (port, master) in targets.items():
                part = measured_load(port, master, args.duration, rate=half)
                results[f"{app}|open"] = combine([part])
                waited = results[f"{app}|open"]["busy_after_s"] = settle(master)
                print(f"  {app} at {half:.0f} req/s: done; idle again {waited} s later",
                      flush=True)  # fmt: skip
            own_half = results["webhook|saturation"]["requests_per_s"] / 2
            own = measured_load(*webhook, args.duration, rate=own_half)
            results["webhook|open-own"] = combine([own])
            queued = redis.Redis.from_url(REDIS_URL).llen(run.queue)
            purged += run.purge()
            experiment_rows = experiments(run, webhook, args) if args.experiments else []
    finally:
        purged += run.purge()
    load_text = conditions()

    webhook_rate = results["webhook|saturation"]["requests_per_s"]
    ratio = webhook_rate / bare_rate
    pairs = pair_ratios(results["webhook|saturation"], results["bare Flask (baseline)|saturation"])
    median_pair = statistics.median(pairs)
    open_p99 = results["webhook|open"]["latency_ms"]["p99"]
    headers = ["app", "load", "req/s", "p50 ms", "p99 ms", "max ms", "gunicorn CPU ms/req",
               "Redis CPU ms/req", "statuses", "errors"]  # fmt: skip
    saturation = f"closed loop, {args.connections} conns"
    rows = [row(app, saturation, results[f"{app}|saturation"]) for app in APPS]
    rows += [row(app, f"open loop {half:.0f} req/s", results[f"{app}|open"]) for app in APPS]
    rows.append(row("webhook", f"open loop {own_half:.0f} req/s (half its own)",
                    results["webhook|open-own"]))  # fmt: skip
    lag = results["webhook|open"]["send_lag_ms"]
    print()
    print(markdown_table(headers, rows))
    print()
    print(f"- webhook / bare requests/s: **{ratio:.2f}** pooled, **{median_pair:.2f}**"
          f" median of {len(pairs)} alternated pairs ("
          + ", ".join(f"{r:.2f}" for r in pairs) + ") (target >= 0.50)")  # fmt: skip
    print(f"- webhook p99 at {half:.0f} req/s: **{open_p99:.1f} ms** (target < 25 ms)")
    print(f"- driver: {results['webhook|saturation']['driver_cpu_percent']}% of a core at "
          f"saturation; open-loop send lag p99 {lag['p99']:.1f} ms")  # fmt: skip
    print(f"- gunicorn {gconf['workers']} x {gconf['worker_class']} ({gconf['threads']} "
          f"threads); {load_text}")  # fmt: skip
    print(f"- tasks left in the private queue: {queued}; {purged} Redis keys purged")
    if experiment_rows:
        print()
        print("Experiments: each against the unchanged webhook, in alternating rounds:")
        print()
        headers = ["variant", "webhook req/s", "variant req/s", "ratio", "variant p50 ms",
                   "variant p99 ms", "webhook CPU ms/req", "variant CPU ms/req",
                   "webhook rounds req/s", "variant rounds req/s"]  # fmt: skip
        print(markdown_table(headers, experiment_rows))
    path = save_results(
        "webhook_throughput" + ("_experiments" if args.experiments else ""),
        {"gunicorn": gconf, "connections": args.connections, "duration_s": args.duration,
         "ratio": round(ratio, 3), "pair_ratios": [round(r, 3) for r in pairs],
         "median_pair_ratio": round(median_pair, 3),
         "half_rate": round(half, 1), "results": results,
         "queued_tasks": queued, "experiments": experiment_rows},
    )  # fmt: skip
    print(f"- results: {path.relative_to(path.parent.parent.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
