"""Generation throughput: one `generate` per message against micro-batched generation.

Random-weight GPT-2 models with the exact shapes of DialoGPT-small (12 layers, width 768)
and DialoGPT-medium (24 x 1024), with GPT-2's 50257-token output layer: the arithmetic
per token is the same as with the real weights. Every reply is exactly `--tokens` long
(`min_new_tokens` = `max_new_tokens`), with the product's default sampling settings.

N threads play N concurrent conversations (as N Celery threads of one worker would), each
asking for `--rounds` replies in a row (more where needed for `--min-replies` in all: two
replies of one conversation cannot tell a 15% difference from noise), through:
- naive-concurrent: each thread calls `generate` for its own message, all at once, on
  its own thread (a threads pool without batching);
- naive-serial: one `generate` at a time, all on the model's torch thread (the product
  with GENERATION_BATCH_SIZE=1; a solo worker or one prefork child is the same);
- batched: the product's path, `ChatModel.reply` through the micro-batcher.

Each path runs in a process of its own, with its own copy of the model.

    python -m bench.generation [--shapes small medium] [--concurrency 1 4 16] [--dtype ...]
                               [--quantization none int8 packed] [--rounds 2] [--min-replies 8]
    python -m bench.generation --alternate-at-one 10 [--shapes ...] [--quantization ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from bench.harness import DIALOGPT_SHAPES, build_dialogpt_shape, save_results
from common.settings import Settings
from worker.context import Turn
from worker.model import ChatModel, GeneratedReply

Result = TypeVar("Result")

# Short WhatsApp-like exchanges of different lengths (prompts of about 10-60 tokens).
OPENERS = [
    "hola, quiero saber si tienen envíos a Cochabamba",
    "Hi! Is the shop open on Sunday?",
    "my order has not arrived yet, can you check it please",
    "¿cuánto cuesta el plan mensual?",
    "thanks",
    "I would like to change the delivery address of my last order to my office",
]


@dataclass
class Row:
    shape: str
    dtype: str
    quantization: str
    path: str
    concurrency: int
    replies: int
    seconds: float
    replies_per_s: float
    tokens_per_s: float
    p50_reply_s: float


def conversation(index: int) -> list[Turn]:
    opener = OPENERS[index % len(OPENERS)]
    turns = [Turn("user", opener)]
    for extra in range(index % 3):
        turns += [Turn("assistant", "Claro, un momento."), Turn("user", f"{opener} ({extra})")]
    return turns


def settings_for(
    model_dir: Path, tokens: int, batch_size: int, dtype: str, quantization: str
) -> Settings:
    """`quantization` "packed" stands for MODEL_PACKED_LINEAR=true (float32 weights, laid
    out for oneDNN): one column for the three ways the linear layers can run."""
    return Settings(
        _env_file=None,
        model_name=str(model_dir),
        device="cpu",
        model_dtype=dtype,
        model_quantization="none" if quantization == "packed" else quantization,
        model_packed_linear=quantization == "packed",
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        generation_batch_size=batch_size,
        generation_batch_wait_ms=5,
    )


def run_threads(
    ask: Callable[[Sequence[Turn]], GeneratedReply], concurrency: int, rounds: int
) -> tuple[float, int, list[float]]:
    """Wall time, tokens generated and per-reply latencies of `concurrency` x `rounds` replies."""
    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()

    def conversation_thread(index: int) -> None:
        nonlocal tokens
        turns = conversation(index)
        for _ in range(rounds):
            started = time.perf_counter()
            reply = ask(turns)
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens += reply.new_tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(conversation_thread, range(concurrency)))
    return time.perf_counter() - started, tokens, latencies


def measure(
    shape: str,
    dtype: str,
    quantization: str,
    model_dir: Path,
    concurrency_levels: Sequence[int],
    tokens: int,
    rounds: int,
    min_replies: int,
    path: str,
) -> list[Row]:
    """One path at every concurrency level, in a process of its own (see `main`)."""
    batch_size = max(concurrency_levels) if path == "batched" else 1
    chat = ChatModel.load(settings_for(model_dir, tokens, batch_size, dtype, quantization))

    def direct(turns: Sequence[Turn]) -> GeneratedReply:
        """`generate` on the calling thread, as a threads pool without batching would."""
        return chat.finish(chat.generate_batch([chat.prompt_ids(turns)])[0])

    ask = direct if path == "naive-concurrent" else chat.reply
    run_threads(ask, 2, 1)  # warm-up: first calls allocate and pick kernels
    rows = []
    for concurrency in concurrency_levels:
        level_rounds = max(rounds, -(-min_replies // concurrency))
        seconds, generated, latencies = run_threads(ask, concurrency, level_rounds)
        replies = concurrency * level_rounds
        row = Row(
            shape=shape,
            dtype=dtype,
            quantization=quantization,
            path=path,
            concurrency=concurrency,
            replies=replies,
            seconds=round(seconds, 2),
            replies_per_s=round(replies / seconds, 3),
            tokens_per_s=round(generated / seconds, 1),
            p50_reply_s=round(statistics.median(latencies), 2),
        )
        print(json.dumps(asdict(row)), flush=True)
        rows.append(row)
    return rows


def alternate_at_one(
    shape: str, dtype: str, quantization: str, model_dir: Path, tokens: int, pairs: int
) -> dict[str, Any]:
    """One conversation, batched against batch size 1, reply by reply in one process.

    Separate processes run minutes apart, and this VM's speed drifts by ~20% in that time;
    alternating the two paths on one model leaves only the difference between them: the
    hop to the batcher's thread and its wait.
    """
    chat = ChatModel.load(settings_for(model_dir, tokens, 16, dtype, quantization))
    turns = conversation(0)

    def alone(turns: Sequence[Turn]) -> GeneratedReply:
        """What GENERATION_BATCH_SIZE=1 does: the torch thread, no batcher."""
        return chat.finish(chat._generate_on_torch_thread([chat.prompt_ids(turns)])[0])

    paths = {"batched": chat.reply, "batch size 1": alone}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for name in paths:
        paths[name](turns)  # warm-up
    for pair in range(pairs):
        order = list(paths) if pair % 2 == 0 else list(reversed(paths))
        for name in order:
            started = time.perf_counter()
            paths[name](turns)
            seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "shape": shape,
        "dtype": dtype,
        "quantization": quantization,
        "pairs": pairs,
        "seconds": {name: [round(v, 3) for v in values] for name, values in seconds.items()},
        "median_s": {name: round(value, 3) for name, value in medians.items()},
        "batched_vs_batch_size_1": round(medians["batch size 1"] / medians["batched"], 3),
    }


def in_own_process(function: Callable[..., Result], *args: Any) -> Result:
    """`function(*args)` in a fresh process: threads that ran torch (naive-concurrent's)
    keep OpenMP pools that would slow every path measured after them (ChatModel)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| shape | dtype | quantization | conversations | path | replies/s | tokens/s "
        "| p50 reply (s) | vs best naive |",
        "|---|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        naive = [
            other.replies_per_s
            for other in rows
            if other.path.startswith("naive")
            and (other.shape, other.dtype, other.quantization, other.concurrency)
            == (row.shape, row.dtype, row.quantization, row.concurrency)
        ]
        ratio = f"{row.replies_per_s / max(naive):.2f}x" if naive else ""
        lines.append(
            f"| {row.shape} | {row.dtype} | {row.quantization} | {row.concurrency} | {row.path} | "
            f"{row.replies_per_s:.2f} | {row.tokens_per_s:.0f} | {row.p50_reply_s:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(DIALOGPT_SHAPES), default=["small"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per reply")
    parser.add_argument("--rounds", type=int, default=2, help="replies per conversation")
    parser.add_argument(
        "--min-replies", type=int, default=8, help="fewest replies at each concurrency level"
    )
    parser.add_argument("--dtype", nargs="+", default=["float32"])
    parser.add_argument(
        "--quantization",
        nargs="+",
        default=["none"],
        choices=["none", "int8", "packed"],
        help="packed: MODEL_PACKED_LINEAR=true",
    )
    parser.add_argument(
        "--paths", nargs="+", default=["naive-concurrent", "naive-serial", "batched"]
    )
    parser.add_argument(
        "--alternate-at-one",
        type=int,
        default=0,
        metavar="PAIRS",
        help="instead: one conversation, batched and batch size 1 alternated PAIRS times",
    )
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    if args.alternate_at_one:
        return run_alternating(args)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as tmp:
        for shape in args.shapes:
            model_dir, _ = build_dialogpt_shape(Path(tmp) / shape, shape)
            for dtype, quantization, path in itertools.product(
                args.dtype, args.quantization, args.paths
            ):
                rows += in_own_process(
                    measure,
                    shape,
                    dtype,
                    quantization,
                    model_dir,
                    args.concurrency,
                    args.tokens,
                    args.rounds,
                    args.min_replies,
                    path,
                )
    rows.sort(key=lambda r: (args.shapes.index(r.shape), args.dtype.index(r.dtype),
                             args.quantization.index(r.quantization), r.concurrency,
                             args.paths.index(r.path)))  # fmt: skip
    save_results("generation", {"rows": [asdict(r) for r in rows]})
    print(table(rows))
    return 0


def run_alternating(args: argparse.Namespace) -> int:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as tmp:
        for shape in args.shapes:
            model_dir, _ = build_dialogpt_shape(Path(tmp) / shape, shape)
            for dtype, quantization in itertools.product(args.dtype, args.quantization):
                result = in_own_process(
                    alternate_at_one,
                    shape,
                    dtype,
                    quantization,
                    model_dir,
                    args.tokens,
                    args.alternate_at_one,
                )
                print(json.dumps(result), flush=True)
                results.append(result)
    save_results("generation_at_one", {"runs": results})
    print("| shape | dtype | quantization | pairs | batched s (median) | batch size 1 s | ratio |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in results:
        median = r["median_s"]
        print(f"| {r['shape']} | {r['dtype']} | {r['quantization']} | {r['pairs']} | "
              f"{median['batched']:.3f} | {median['batch size 1']:.3f} | "
              f"{r['batched_vs_batch_size_1']:.2f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
