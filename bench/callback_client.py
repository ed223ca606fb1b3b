"""CPU per callback: the worker's CallbackClient against the same POST sent two other ways.

All three POST the same signed reply to the benchmark's callback receiver (keep-alive, on
loopback): `CallbackClient.post` as the worker sends it (request prepared by the client,
sent on its session); the same request through requests' `Session.post` with the same
arguments, as the client sent it before; and urllib3 directly, the floor under requests.
The time is the calling thread's CPU (`time.thread_time`), so the receiver's work on its
own thread is left out. Rounds alternate between the three, so drift hits all alike.

    python -m bench.callback_client [--calls 2000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import urllib3

from bench.harness import callback_receiver, conditions, markdown_table, save_results
from common.messages import CallbackPayload
from worker.callback import IDEMPOTENCY_HEADER, CallbackClient, _origin, _proxies_for

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a test key in Standard Webhooks' form
KEY = "6b92e3e6f14bcaf1c3377a7d477ecfdd"
PAYLOAD = CallbackPayload(
    to="+59170000001",
    session_id="+59170000001",
    reply="Claro, te ayudo con eso.",
    in_reply_to=["wamid.HBgLNTkxNzAwMDAwMDEVAgASGBQzQTdCRDkyRTM4QjVDMTk1QkJGMQA="],
    conversation_id="conv_+59170000001_1764079200",
    metadata={"phone_number_id": "106540352242922"},
    model="microsoft/DialoGPT-medium",
    generated_at="2026-11-25T14:00:00+00:00",
    latency_ms=5,
)


def cpu_us_per_call(call: Callable[[], object], calls: int) -> float:
    started = time.thread_time()
    for _ in range(calls):
        call()
    return (time.thread_time() - started) / calls * 1e6


def ways(url: str) -> dict[str, Callable[[], object]]:
    """The three ways of sending the reply, each checked to get a 200."""
    client = CallbackClient(timeout=5, secret=SECRET)
    session = client._session  # the same kept-alive connections

    def session_post() -> object:
        body = PAYLOAD.model_dump_json()
        headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: KEY,
                   **client._signature_headers(KEY, body)}  # fmt: skip
        response = session.post(url, data=body.encode(), headers=headers, timeout=5,
                                allow_redirects=False, proxies=_proxies_for(_origin(url)),
                                verify=True)  # fmt: skip
        assert response.status_code == 200
        return response

    parts = urlsplit(url)
    pool = urllib3.HTTPConnectionPool(parts.hostname, parts.port)

    def urllib3_post() -> object:
        body = PAYLOAD.model_dump_json()
        headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: KEY,
                   **client._signature_headers(KEY, body)}  # fmt: skip
        response = pool.request("POST", parts.path, body=body.encode(), headers=headers,
                                timeout=5, retries=False)  # fmt: skip
        assert response.status == 200
        return response

    return {
        "CallbackClient.post (the worker's)": lambda: client.post(url, PAYLOAD, KEY),
        "requests Session.post, same arguments (before)": session_post,
        "urllib3 directly (floor)": urllib3_post,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="per way and round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)

    with callback_receiver() as receiver:
        senders = ways(receiver.url)
        for send in senders.values():
            cpu_us_per_call(send, 200)  # warm-up: connections open, code paths hot
        results: dict[str, list[float]] = {name: [] for name in senders}
        for _ in range(args.rounds):
            for name, send in senders.items():
                results[name].append(round(cpu_us_per_call(send, args.calls), 1))
    rows = [[name, ", ".join(f"{v:.0f}" for v in values), min(values)]
            for name, values in results.items()]  # fmt: skip
    print(markdown_table(["way", "CPU µs per call, each round", "best"], rows))
    print(f"- {conditions()}")
    path = save_results("callback_client", {"calls": args.calls, "cpu_us": results})
    print(f"- results: {path.relative_to(path.parent.parent.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
