"""Benchmark 6b: one exact scan of every vector, by the number type of the copy it reads.

    python bench/scan_dtypes.py [--sizes 100000 1000000] [--repeats 15]

An exact search over the whole library multiplies every stored 512-d vector by the query (scan_copy.py).
This times that product alone, p50 over `--repeats`, for numpy's float32 product and torch's
matrix-vector product in float32, float16 and bfloat16, on random unit vectors held in memory, and
the largest score error of each against float64. Which half-precision type is fast depends on the CPU
and the torch build, so the CPU's flags that matter are printed with the table.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import markdown_table, median, report
from query_latency import milliseconds

DIM = 512
FLAGS = ("avx2", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100000, 1000000])
    parser.add_argument("--repeats", type=int, default=15)
    return parser.parse_args()


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    present = set(text.split("flags", 1)[1].splitlines()[0].split()) if "flags" in text else set()
    return ", ".join(flag for flag in FLAGS if flag in present) or "none of " + ", ".join(FLAGS)


def unit_rows(count: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, DIM), dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def products(vectors: np.ndarray, query: np.ndarray) -> dict[str, Callable[[], np.ndarray]]:
    """Each way of scoring every row, as a call that returns float32 scores."""
    table32, query32 = torch.from_numpy(vectors), torch.from_numpy(query)
    table16, query16 = table32.half(), query32.half()
    table_b16, query_b16 = table32.bfloat16(), query32.bfloat16()
    return {
        "numpy float32": lambda: vectors @ query,
        "torch float32": lambda: torch.mv(table32, query32).numpy(),
        "torch float16": lambda: torch.mv(table16, query16).float().numpy(),
        "torch bfloat16": lambda: torch.mv(table_b16, query_b16).float().numpy(),
    }


def p50_ms(call: Callable[[], object], repeats: int) -> float:
    call()
    return median([milliseconds(call) for _ in range(repeats)])


def main() -> None:
    args = parse_args()
    rows = []
    for size in args.sizes:
        vectors, query = unit_rows(size, seed=size), unit_rows(1, seed=1)[0]
        truth = vectors.astype(np.float64) @ query.astype(np.float64)
        calls = products(vectors, query)
        timed = {name: (p50_ms(call, args.repeats), call()) for name, call in calls.items()}
        base = timed["numpy float32"][0]
        for name, (ms, scores) in timed.items():
            rows.append([size, name, ms, base / ms, f"{np.abs(scores - truth).max():.1e}"])
    headers = ["rows", "product", "p50 ms", "speed-up over numpy float32", "max score error"]
    table = markdown_table(headers, rows)
    notes = [
        f"CPU flags: {cpu_flags()}; torch threads {torch.get_num_threads()}. The scan copy is float16 "
        "(scan_copy.py); its candidates are ranked again in float32, so the error only sets how many "
        "extra candidates a scan keeps.",
    ]
    report("Exact scan: the copy's number type", [table], notes)


if __name__ == "__main__":
    main()
