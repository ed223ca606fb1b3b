"""What a Celery task costs the worker, apart from the reply it makes.

The pipeline benchmark shows a message answered by its own task costing the worker ~2 ms
more CPU than one answered by a task that looks again. This measures the part that is
Celery's: the real worker (bench.instant_worker, production settings and task) is given
reply tasks for sessions with nothing pending, so each task takes the session's lock,
finds nothing, releases it and returns. The same empty round is then timed in-process
(`Responder.answer` without Celery, calling thread's CPU) and subtracted.

Two ways of queueing, both pools:
- "queue full": all tasks are pushed at once (one pipeline of LPUSHes, as the webhook's
  accept script writes them), so the worker drains a full queue;
- "one at a time": the next task is pushed once the previous one has finished, as a
  message that needs its own task meets an idle worker; wake-ups are in the price.

`--variant kombu-transport` also measures each pool with kombu's own Redis transport,
which builds a client object per acknowledgement (as before `common.broker`), alternating
with the code as it is.

    python -m bench.task_overhead [--tasks 2000] [--workers threads:8 prefork:2]
        [--variant kombu-transport] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from bench.harness import (
    REDIS_URL,
    Run,
    celery_command,
    conditions,
    cpu_seconds,
    markdown_table,
    process,
    process_tree,
    save_results,
)
from common.queue import ReplyTaskMessages, make_celery
from common.settings import get_settings

DEFAULT_WORKERS = ["threads:8", "prefork:2"]
VARIANTS = {"kombu-transport": {"BENCH_KOMBU_TRANSPORT": "1"}}


class Finished:
    """Counts the tasks the instant worker has seen end (its `postrun` lines), reading
    only what was appended since the last look."""

    def __init__(self, stages: Path, log: Path) -> None:
        self._stages, self._log = stages, log
        self._offset = self.count = 0

    def wait_for(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.count < count:
            if self._stages.exists():
                with self._stages.open("rb") as stages:
                    stages.seek(self._offset)
                    new = stages.read()
                complete = new[: new.rfind(b"\n") + 1]
                self._offset += len(complete)
                self.count += sum(
                    1 for line in complete.splitlines() if line.startswith(b"postrun ")
                )
            if self.count >= count:
                return
            if time.monotonic() > deadline:
                tail = self._log.read_text(errors="replace")[-3000:]
                raise TimeoutError(f"{self.count} of {count} tasks finished\n{tail}")
            time.sleep(0.001)


def empty_round_cpu_us(rounds: int) -> float:
    """CPU of `Responder.answer` for a session with nothing pending, in this thread."""
    from worker import runtime  # reads the settings main() put in the environment

    responder = runtime.responder()
    for n in range(100):  # warm-up: connections open, scripts loaded
        responder.answer(f"+5917{n:07d}")
    started = time.thread_time()
    for n in range(rounds):
        responder.answer(f"+5918{n:07d}")
    return (time.thread_time() - started) / rounds * 1e6


def measure(spec: str, run: Run, tasks: int, variant: str | None) -> list[dict[str, Any]]:
    pool, concurrency = spec.split(":")
    name = f"{pool}-{concurrency}-{variant or 'as-is'}-{time.monotonic_ns()}"
    stages, log = run.logs / f"stages-{name}.txt", run.logs / f"worker-{name}.log"
    env = run.env(BENCH_STAGES=str(stages), LOG_LEVEL="INFO", **VARIANTS.get(variant or "", {}))
    command = celery_command("bench.instant_worker", pool, int(concurrency), f"bench-{pool}")
    client = redis.Redis.from_url(REDIS_URL)
    messages = ReplyTaskMessages(make_celery(get_settings()))  # for this run's queue
    finished = Finished(stages, log)
    rows = []
    with process(command, env, log) as worker:
        client.lpush(run.queue, messages.build("+59160000000"))
        finished.wait_for(1)  # started and consuming
        done = 1
        for mode in ("queue full", "one at a time"):
            batch = [messages.build(f"+5916{mode[0]}{n:06d}") for n in range(tasks)]
            pids = process_tree(worker.pid)
            cpu_before, started = cpu_seconds(pids), time.perf_counter()
            if mode == "queue full":
                pipe = client.pipeline(transaction=False)
                for message in batch:
                    pipe.lpush(run.queue, message)
                pipe.execute()
                done += tasks
                finished.wait_for(done)
            else:
                for message in batch:
                    client.lpush(run.queue, message)
                    done += 1
                    finished.wait_for(done)
            seconds = time.perf_counter() - started
            cpu_ms = (cpu_seconds(pids) - cpu_before) * 1000 / tasks
            rows.append({"worker": f"{pool} x{concurrency}", "variant": variant or "as is",
                         "mode": mode, "tasks": tasks,
                         "tasks_per_s": round(tasks / seconds, 1),
                         "worker_cpu_ms_per_task": round(cpu_ms, 3),
                         "conditions": conditions()})  # fmt: skip
            print(f"  {pool} x{concurrency} ({variant or 'as is'}), {mode}: {cpu_ms:.2f} ms of "
                  "worker CPU per task", flush=True)  # fmt: skip
    client.close()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000, help="per pool and way of queueing")
    parser.add_argument("--workers", nargs="+", default=DEFAULT_WORKERS, help="pool:concurrency")
    parser.add_argument("--variant", choices=sorted(VARIANTS))
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds")
    args = parser.parse_args(argv)

    run = Run.new("task")
    print(f"logs in {run.logs}")
    os.environ.update(run.env(LOG_LEVEL="WARNING"))  # this run's queue and key prefix
    get_settings.cache_clear()
    try:
        rows = [row for _ in range(args.rounds) for spec in args.workers
                for variant in (None, args.variant)[: 2 if args.variant else 1]
                for row in measure(spec, run, args.tasks, variant)]  # fmt: skip
        round_us = empty_round_cpu_us(args.tasks)
    finally:
        purged = run.purge()
    table = [
        [r["worker"], r["variant"], r["mode"], r["tasks"], r["tasks_per_s"],
         r["worker_cpu_ms_per_task"],
         round(round_us / 1000, 3), round(r["worker_cpu_ms_per_task"] - round_us / 1000, 3)]
        for r in rows
    ]  # fmt: skip
    print(markdown_table(["worker", "code", "queueing", "tasks", "tasks/s", "worker CPU ms/task",
                          "of which the empty round (in-process)", "Celery's share ms"],
                         table))  # fmt: skip
    print(f"- {conditions()}; {purged} Redis keys purged")
    path = save_results("task_overhead", {"rows": rows, "empty_round_cpu_us": round(round_us)})
    print(f"- results: {path.relative_to(path.parent.parent.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
