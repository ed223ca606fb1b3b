"""Cost of sampling one token per row per decoding step: transformers against worker.sampling.

transformers: its temperature, top-k and top-p warpers, softmax and `torch.multinomial`
over the whole vocabulary, as `generate(do_sample=True)` runs them. Ours: `SampleAmongTopK`
(the same distribution, drawn among the top-k) and the argmax of `generate(do_sample=False)`.
Both on the same random scores of GPT-2's 50257-token vocabulary, at several batch sizes,
with the product's default temperature, top-k and top-p; the time is the mean of `--steps`.

    python -m bench.sampling [--batch 1 4 16] [--steps 50]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from common.settings import Settings
from worker.sampling import SampleAmongTopK

VOCAB = 50257


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

    defaults = Settings(_env_file=None)
    temperature, top_k, top_p = defaults.temperature, defaults.top_k, defaults.top_p
    warpers = LogitsProcessorList(
        [TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)]
    )
    ours = SampleAmongTopK(temperature, top_k, top_p)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"temperature {temperature}, top-k {top_k}, top-p {top_p}")  # fmt: skip
    print("| batch | transformers (ms/step) | among the top-k | saved |")
    print("|---:|---:|---:|---:|")
    for batch in args.batch:
        torch.manual_seed(batch)
        ids = torch.zeros((batch, 8), dtype=torch.long)
        scores = torch.randn(batch, VOCAB)

        def transformers_step(ids=ids, scores=scores) -> torch.Tensor:
            probs = warpers(ids, scores.clone()).softmax(dim=-1)
            return torch.multinomial(probs, num_samples=1).squeeze(1)

        def our_step(ids=ids, scores=scores) -> torch.Tensor:
            return ours(ids, scores.clone()).argmax(dim=-1)

        theirs_ms = mean_ms(transformers_step, args.steps)
        ours_ms = mean_ms(our_step, args.steps)
        print(f"| {batch} | {theirs_ms:.2f} | {ours_ms:.2f} | {theirs_ms - ours_ms:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
