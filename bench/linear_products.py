"""Time of each matrix product a decoding step makes, torch's default against packed weights.

A decoding step of the DialoGPT-small shape multiplies 1 to 16 rows (one per conversation
in the batch) by the same weights: four products per layer and the 768 -> 50257 output
layer. `nn.Linear` hands them to the BLAS torch was built with (MKL in the CPU wheels);
`MODEL_PACKED_LINEAR=true` hands them to oneDNN with each weight laid out once
(`worker.packing.PackedLinear`). How much that buys depends on the CPU: MKL picks its
kernels by vendor, so the same products can run at different speeds on an AMD and an
Intel core of similar speed while oneDNN's stay alike (BENCHMARKS.md, section 3). This
measures it in a minute, without building a model; compare the table across machines.

    python -m bench.linear_products [--rows 1 4 16] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from bench.harness import cpu_description, markdown_table, save_results
from worker.packing import PackedLinear, packing_unavailable

# (in, out) of the DialoGPT-small shape's products, and how many a decoding step makes.
PRODUCTS = {
    "attention in (768 -> 2304)": (768, 2304, 12),
    "attention out (768 -> 768)": (768, 768, 12),
    "MLP in (768 -> 3072)": (768, 3072, 12),
    "MLP out (3072 -> 768)": (3072, 768, 12),
    "output layer (768 -> 50257)": (768, 50257, 1),
}


def median_ms(layer: nn.Module, rows: torch.Tensor, repeats: int) -> float:
    layer(rows)  # warm-up: oneDNN builds its kernel for a shape on the first call
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        layer(rows)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    if (missing := packing_unavailable()) is not None:
        raise SystemExit(f"packed products cannot run: {missing}")

    cpu = cpu_description()
    print(f"{cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    measured: list[dict[str, object]] = []
    step = {rows: {"default": 0.0, "packed": 0.0} for rows in args.rows}
    with torch.inference_mode():
        for name, (inputs, outputs, per_step) in PRODUCTS.items():
            default = nn.Linear(inputs, outputs)
            packed = PackedLinear(default.weight, default.bias)
            for rows in args.rows:
                x = torch.randn(rows, inputs)
                default_ms = median_ms(default, x, args.repeats)
                packed_ms = median_ms(packed, x, args.repeats)
                step[rows]["default"] += default_ms * per_step
                step[rows]["packed"] += packed_ms * per_step
                measured.append({"product": name, "rows": rows, "default_ms": default_ms,
                                 "packed_ms": packed_ms})  # fmt: skip
    rows_out = [
        [m["product"], m["rows"], f"{m['default_ms']:.2f}", f"{m['packed_ms']:.2f}",
         f"{m['default_ms'] / m['packed_ms']:.2f}x"]  # type: ignore[operator]
        for m in measured
    ]  # fmt: skip
    rows_out += [
        [f"**one decoding step** (the products only, {sum(p[2] for p in PRODUCTS.values())})",
         rows, f"{ms['default']:.1f}", f"{ms['packed']:.1f}",
         f"{ms['default'] / ms['packed']:.2f}x"]
        for rows, ms in step.items()
    ]  # fmt: skip
    headers = ["product", "rows", "nn.Linear ms", "packed ms", "packed speed-up"]
    print(markdown_table(headers, rows_out))
    path = save_results("linear_products", {"products": measured,
                                            "decoding_step_ms": step})  # fmt: skip
    print(f"- results: {path.relative_to(path.parent.parent.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
