"""Cost of top-p filtering per decoding step: transformers' full sort against worker.sampling.

Both filters run after transformers' top-k on the same random scores of GPT-2's 50257-token
vocabulary, at several batch sizes; the time is the mean of `--steps` calls.

    python -m bench.sampling [--batch 1 4 16] [--steps 50]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from worker.sampling import TopPAmongTopK

VOCAB = 50257
TOP_K, TOP_P = 50, 0.92  # the product's defaults


def mean_ms(step: Callable[[], object], steps: int) -> float:
    step()  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps * 1000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)

    top_k = TopKLogitsWarper(TOP_K)
    theirs, ours = TopPLogitsWarper(TOP_P), TopPAmongTopK(TOP_P, TOP_K)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| batch | top-k + transformers top-p (ms/step) | top-k + top-p among top-k | saved |")
    print("|---:|---:|---:|---:|")
    for batch in args.batch:
        torch.manual_seed(batch)
        ids = torch.zeros((batch, 8), dtype=torch.long)
        scores = torch.randn(batch, VOCAB)

        def filtered(top_p: Callable, ids=ids, scores=scores) -> object:
            return top_p(ids, top_k(ids, scores.clone()))

        full = mean_ms(lambda: filtered(theirs), args.steps)
        among = mean_ms(lambda: filtered(ours), args.steps)
        print(f"| {batch} | {full:.2f} | {among:.2f} | {full - among:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
