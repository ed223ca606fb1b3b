"""End to end: a real gunicorn webhook, a real Celery worker on a tiny model loaded through
`from_pretrained`, and a local server playing n8n.

Every test runs against both pools the product supports: prefork (two child processes,
a model each) and threads (one process, one model, replies merged into batches).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests
from celery import Celery

from common.keys import session_keys, worker_heartbeat_pattern
from common.privacy import mask_phone
from common.queue import REPLY_TASK
from tests.processes import (
    CallbackReceiver,
    callback_receiver,
    celery_worker_command,
    gunicorn_command,
    http_ok,
    process_env,
    running,
    wait_until,
)
from tests.redis_server import free_port
from worker.tiny_model import build_tiny_model

pytestmark = pytest.mark.e2e

WORKER_PROCESSES = 2  # prefork children
WORKER_THREADS = 4
# Model loads expected per worker: one per prefork child, one for the threads pool.
MODEL_COPIES = {"prefork": WORKER_PROCESSES, "threads": 1}
# Long enough replies that a burst posted during one generation lands inside it.
REPLY_TOKENS = 96


@dataclass
class System:
    base_url: str
    receiver: CallbackReceiver
    redis: redis.Redis
    prefix: str
    worker_log: Path
    env: dict[str, str]
    workdir: Path
    pool: str

    @property
    def worker_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.env['WORKER_METRICS_PORT']}/metrics"

    def post(self, **message: object) -> requests.Response:
        return requests.post(f"{self.base_url}/webhook", json=message, timeout=10)


@pytest.fixture(scope="module", params=["prefork", "threads"])
def system(
    request: pytest.FixtureRequest, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    pool: str = request.param
    workdir = tmp_path_factory.mktemp(f"e2e-{pool}")
    model_dir = build_tiny_model(workdir / "model", layers=2, width=96, heads=2, context=384)
    unique = uuid.uuid4().hex[:10]
    prefix = f"e2e-{unique}"
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with callback_receiver() as receiver:
        env = process_env(
            {
                "REDIS_URL": redis_url,
                "KEY_PREFIX": prefix,
                "TASK_QUEUE": f"e2e-queue-{unique}",
                "MODEL_NAME": str(model_dir),
                "N8N_CALLBACK_URL": receiver.url,
                "MAX_NEW_TOKENS": str(REPLY_TOKENS),
                "MIN_NEW_TOKENS": str(REPLY_TOKENS),
                "DO_SAMPLE": "false",
                "RATE_LIMIT_PER_MINUTE": "0",
                "CALLBACK_RETRY_BACKOFF_SECONDS": "1",
                # Lets the first of a few messages posted together wait for the others.
                "GENERATION_BATCH_WAIT_MS": "50",
                "LOG_LEVEL": "INFO",
            }
        )
        port, metrics_port = free_port(), free_port()
        env["WORKER_METRICS_PORT"] = str(metrics_port)
        worker_log, web_log = workdir / "worker.log", workdir / "web.log"
        concurrency = WORKER_PROCESSES if pool == "prefork" else WORKER_THREADS
        worker_cmd = celery_worker_command(f"e2e-{unique}", concurrency, pool)
        with (
            running(worker_cmd, env, worker_log, cwd=workdir),
            running(gunicorn_command(port), env, web_log, cwd=workdir),
        ):
            base_url = f"http://127.0.0.1:{port}"
            wait_until(lambda: http_ok(f"{base_url}/health"), 30, "gunicorn", web_log)
            wait_until(
                lambda: (
                    worker_log.read_text(errors="replace").count("model loaded")
                    >= MODEL_COPIES[pool]
                    and bool(list(client.scan_iter(match=worker_heartbeat_pattern(prefix))))
                ),
                120,
                "celery worker",
                worker_log,
            )
            yield System(base_url, receiver, client, prefix, worker_log, env, workdir, pool)
    for key in client.scan_iter(match=f"{prefix}:*"):
        client.delete(key)
    client.close()


def new_session() -> str:
    return f"+5917{uuid.uuid4().int % 10**7:07d}"


def test_reply_reaches_the_callback_with_the_contract(system: System):
    session = new_session()

    response = system.post(
        message_id="wamid.e2e.1",
        **{"from": session},
        text="Hola, quiero una cita",
        name="Ana",
        metadata={"phone_number_id": "106540352242922"},
    )

    assert response.status_code == 202
    system.receiver.wait_for(lambda got: any(c.body["session_id"] == session for c in got))
    (callback,) = system.receiver.for_session(session)
    body = callback.body
    assert callback.path == "/n8n/reply"
    assert body["to"] == session
    assert body["in_reply_to"] == ["wamid.e2e.1"]
    assert body["metadata"] == {"phone_number_id": "106540352242922"}
    assert isinstance(body["reply"], str) and body["reply"].strip()
    assert body["model"].endswith("model")
    assert body["conversation_id"].startswith(f"conv_{session}_")
    assert body["latency_ms"] >= 0
    assert re.fullmatch(r"[0-9a-f]{32}", callback.headers["Idempotency-Key"])

    history = requests.get(f"{system.base_url}/chat/history/{session}", timeout=5).json()
    assert history["conversation_id"] == body["conversation_id"]
    assert history["user_id"] == session
    assert [(m["role"], m["content"]) for m in history["messages"]] == [
        ("user", "Hola, quiero una cita"),
        ("assistant", body["reply"]),
    ]
    assert history["metadata"] == {"name": "Ana"}


def test_duplicate_message_is_answered_once(system: System):
    session = new_session()
    first = system.post(message_id="dup-1", **{"from": session}, text="hola")
    repeat = system.post(message_id="dup-1", **{"from": session}, text="hola")
    # A later message of the same session is answered after anything queued before it,
    # so once its reply arrives, a reply to a wrongly queued duplicate would have too.
    system.post(message_id="dup-2", **{"from": session}, text="sigues ahí?")

    system.receiver.wait_for(
        lambda got: any(
            "dup-2" in c.body["in_reply_to"] for c in got if c.body["session_id"] == session
        )
    )

    assert (first.status_code, repeat.status_code) == (202, 200)
    assert repeat.json()["status"] == "duplicate"
    answered = [mid for c in system.receiver.for_session(session) for mid in c.body["in_reply_to"]]
    assert answered.count("dup-1") == 1
    assert answered.count("dup-2") == 1


def test_bubbles_sent_during_a_generation_get_one_reply(system: System):
    session = new_session()
    keys = session_keys(system.prefix, session)
    system.post(message_id="b-1", **{"from": session}, text="hola")
    wait_until(lambda: system.redis.llen(keys.processing) > 0, 30, "generation of b-1")

    statuses = [
        system.post(message_id=f"b-{n}", **{"from": session}, text=text).status_code
        for n, text in [(2, "quiero una cita"), (3, "para mañana"), (4, "a las 10")]
    ]

    callbacks = system.receiver.wait_for(
        lambda got: (
            sum(len(c.body["in_reply_to"]) for c in got if c.body["session_id"] == session) >= 4
        )
    )
    assert statuses == [202, 202, 202]
    mine = [c.body["in_reply_to"] for c in callbacks if c.body["session_id"] == session]
    assert mine == [["b-1"], ["b-2", "b-3", "b-4"]]
    history = requests.get(f"{system.base_url}/chat/history/{session}", timeout=5).json()
    assert [m["role"] for m in history["messages"]] == [
        "user", "assistant", "user", "user", "user", "assistant"
    ]  # fmt: skip


def test_bursts_for_several_sessions_are_answered_in_order_exactly_once(system: System):
    sessions = [new_session() for _ in range(3)]
    sent: dict[str, list[str]] = {s: [] for s in sessions}
    for n in range(8):
        for s in sessions:
            message_id = f"o-{sessions.index(s)}-{n}-{s[-4:]}"
            assert (
                system.post(message_id=message_id, **{"from": s}, text=f"mensaje {n}").status_code
                == 202
            )
            sent[s].append(message_id)

    def all_answered(got) -> bool:
        answered = {mid for c in got for mid in c.body["in_reply_to"]}
        return all(mid in answered for ids in sent.values() for mid in ids)

    system.receiver.wait_for(all_answered, timeout=180)

    for s in sessions:
        callbacks = system.receiver.for_session(s)
        answered = [mid for c in callbacks for mid in c.body["in_reply_to"]]
        assert answered == sent[s]
        history = requests.get(f"{system.base_url}/chat/history/{s}", timeout=5).json()
        replies = [m["content"] for m in history["messages"] if m["role"] == "assistant"]
        assert replies == [c.body["reply"] for c in callbacks]


@contextlib.contextmanager
def task_events(system: System) -> Iterator[tuple[Celery, list[dict]]]:
    """Collect the task events our worker publishes, with Celery's own event receiver."""
    app = Celery(broker=system.env["REDIS_URL"])
    ours = f"{system.prefix}@"  # the worker's node name starts with the prefix
    events: list[dict] = []

    def keep(event: dict) -> None:
        if str(event.get("hostname", "")).startswith(ours):
            events.append(event)

    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": keep})
        thread = threading.Thread(target=receiver.capture, daemon=True)
        thread.start()
        try:
            # capture() asks every worker for a heartbeat once it listens: ours arriving
            # means nothing our worker sends from now on can be missed.
            wait_until(lambda: any(e["type"] == "worker-heartbeat" for e in events), 15,
                       "worker heartbeat event")  # fmt: skip
            yield app, events
        finally:
            receiver.should_stop = True
            thread.join(timeout=10)
        app.close()


def test_task_events_are_sent_only_once_a_monitor_asks(system: System):
    # Runs before the flower test: flower turns the worker's task events on for good.
    def task_events_for(session: str) -> list[dict]:
        ids = {e["uuid"] for e in events if mask_phone(session) in str(e.get("args", ""))}
        return [e for e in events if e.get("uuid") in ids]

    def answered(session: str) -> None:
        system.receiver.wait_for(lambda _: bool(system.receiver.for_session(session)), 60)

    with task_events(system) as (app, events):
        quiet = new_session()
        system.post(message_id=f"quiet-{uuid.uuid4().hex}", **{"from": quiet}, text="hola")
        answered(quiet)
        time.sleep(1)  # task events are flushed by the worker's event loop, within ms
        assert not [e for e in events if e["type"].startswith("task-")]

        replies = app.control.broadcast("enable_events", reply=True, timeout=5)
        assert any(system.prefix in name for reply in replies for name in reply)
        watched = new_session()
        system.post(message_id=f"watched-{uuid.uuid4().hex}", **{"from": watched}, text="hola")
        answered(watched)
        wait_until(
            lambda: (
                {"task-received", "task-succeeded"} <= {e["type"] for e in task_events_for(watched)}
            ),
            15,
            "task events after enable_events",
        )


def test_flower_shows_the_reply_task(system: System):
    port = free_port()
    env = {**system.env, "FLOWER_UNAUTHENTICATED_API": "true"}
    command = [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={port}"]
    log_path = system.workdir / "flower.log"
    with running(command, env, log_path, cwd=system.workdir):
        flower = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{flower}/healthcheck"), 60, "flower", log_path)
        session = new_session()

        def reply_task_listed() -> bool:
            tasks = requests.get(f"{flower}/api/tasks", timeout=5).json().values()
            return any(
                t.get("name") == REPLY_TASK
                and mask_phone(session) in (t.get("args") or "")
                and t.get("state") == "SUCCESS"
                for t in tasks
            )

        # Flower answers before its event receiver is connected, and events sent before
        # that are not replayed: send messages until one of their tasks shows up.
        for attempt in range(10):
            system.post(message_id=f"flower-{attempt}", **{"from": session}, text="hola")
            with contextlib.suppress(TimeoutError):
                wait_until(reply_task_listed, 3, "reply task in flower")
                break
        else:
            raise AssertionError(f"flower never listed a reply task:\n{log_path.read_text()}")
        shown = requests.get(f"{flower}/api/tasks", timeout=5).text
        assert session not in shown  # flower shows the masked number only


def _sample(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text format (0 if absent)."""
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_metrics_move_after_real_requests(system: System):
    before_web = requests.get(f"{system.base_url}/metrics", timeout=5).text
    before_worker = requests.get(system.worker_metrics_url, timeout=5).text
    session = new_session()

    system.post(message_id="metrics-1", **{"from": session}, text="hola")
    system.post(message_id="metrics-1", **{"from": session}, text="hola")
    system.receiver.wait_for(lambda got: any(c.body["session_id"] == session for c in got))
    time.sleep(0.5)  # the worker counts the delivery right after the POST returns

    web = requests.get(f"{system.base_url}/metrics", timeout=5).text
    worker = requests.get(system.worker_metrics_url, timeout=5).text
    queued = 'webhook_messages_total{outcome="queued"}'
    duplicate = 'webhook_messages_total{outcome="duplicate"}'
    accepted = 'webhook_requests_total{method="POST",route="/webhook",status="202"}'
    assert _sample(web, queued) == _sample(before_web, queued) + 1
    assert _sample(web, duplicate) == _sample(before_web, duplicate) + 1
    assert _sample(web, accepted) == _sample(before_web, accepted) + 1
    generations = "worker_generation_seconds_count"
    delivered = 'worker_callback_attempts_total{outcome="delivered"}'
    assert _sample(worker, generations) >= _sample(before_worker, generations) + 1
    assert _sample(worker, delivered) >= _sample(before_worker, delivered) + 1
    assert _sample(worker, "worker_generated_tokens_total") >= REPLY_TOKENS
    assert "worker_queue_depth" in worker


def test_concurrent_conversations_share_generate_calls_on_the_threads_pool(system: System):
    sessions = [new_session() for _ in range(WORKER_THREADS)]
    batches = "worker_generation_batch_size_count"
    replies = "worker_generation_batch_size_sum"
    before = requests.get(system.worker_metrics_url, timeout=5).text

    with ThreadPoolExecutor(max_workers=len(sessions)) as pool:
        statuses = list(
            pool.map(
                lambda s: (
                    system.post(
                        message_id=f"batch-{s[-4:]}", **{"from": s}, text="hola"
                    ).status_code
                ),
                sessions,
            )
        )
    system.receiver.wait_for(
        lambda got: {c.body["session_id"] for c in got} >= set(sessions), timeout=60
    )
    time.sleep(0.5)
    after = requests.get(system.worker_metrics_url, timeout=5).text

    assert statuses == [202] * len(sessions)
    for session in sessions:
        [callback] = system.receiver.for_session(session)
        assert callback.body["in_reply_to"] == [f"batch-{session[-4:]}"]
    assert _sample(after, replies) - _sample(before, replies) == len(sessions)
    generate_calls = _sample(after, batches) - _sample(before, batches)
    if system.pool == "threads":
        assert generate_calls < len(sessions), "no two conversations shared a generate call"
    else:
        assert generate_calls == len(sessions)  # one task, one reply at a time per child


def test_cli_send_posts_and_prints_the_reply(system: System):
    result = subprocess.run(
        [
            sys.executable, "-m", "worker", "send", "hola desde la consola",
            "--from", new_session(), "--url", f"{system.base_url}/webhook", "--timeout", "60",
        ],
        env=system.env, cwd=system.workdir, capture_output=True, text=True, timeout=90,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert "webhook answered 202" in result.stdout
    assert re.search(r"^reply: .+", result.stdout, re.M)


def test_model_is_loaded_once_per_worker_process(system: System):
    # Runs last in this module: by now the worker has run many tasks.
    time.sleep(0.5)
    log = system.worker_log.read_text(errors="replace")
    loads = re.findall(r"model loaded .* pid=(\d+)", log)
    replies = len(re.findall(r"replied to=", log))

    copies = MODEL_COPIES[system.pool]
    assert replies > 2 * copies
    assert len(loads) == copies
    assert len(set(loads)) == copies


def test_worker_logs_one_line_per_reply(system: System):
    log = system.worker_log.read_text(errors="replace")
    assert re.search(r"replied to=\+591\*{4}\d{4} messages=\d+", log)
    # Celery's own per-task lines say nothing the reply line does not (INFO level).
    assert not re.search(r"Task worker\.reply_to_session\[[^\]]+\] (received|succeeded)", log)
    assert re.search(r"@\S+ ready\.", log)  # Celery's other INFO lines stay


def test_process_logs_carry_no_raw_phone_number(system: System):
    # Its own message, so the logs hold a number to mask even when this test runs alone.
    session = new_session()
    system.post(message_id=f"privacy-{uuid.uuid4().hex}", **{"from": session}, text="hola")
    system.receiver.wait_for(lambda _: bool(system.receiver.for_session(session)), 60)
    time.sleep(0.5)  # the worker writes its reply line just after the callback
    logs = system.worker_log.read_text(errors="replace") + (system.workdir / "web.log").read_text(
        errors="replace"
    )
    assert mask_phone(session) in logs
    assert re.search(r"\+591\*{4}\d{4}", logs)  # masked numbers are there
    assert not re.search(r"\+5917\d{7}", logs)
