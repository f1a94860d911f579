"""Benchmark 6c: a compressed first pass in place of the float16 scan, at one million images.

    python bench/first_pass.py [--size 1000000] [--queries 100]

Below FIRST_PASS_MIN images an exact search scans the float16 copy of every vector (scan_copy.py):
1 GB per query at 1M images, bound by memory bandwidth. This measures, on the synthetic library of
bench/synthetic.py (the same vectors, without building the Chroma collection) and in one run, how a
first pass over 4-bit product-quantisation codes (faiss `IndexPQFastScan`, inner product, as
product_codes.py uses above FIRST_PASS_MIN) followed by the same exact float32 ranking of its
candidates compares with that scan: bytes per image, time to build the codes, recall@10 against
exact cosine, and p50 / p99 per query. Queries are the hard case of bench/scale.py (text encodings
of COCO captions by the ViT-B/32-architecture model, random directions to the library) and the easy
one (stored vectors, as "more like this" sends).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import faiss
import numpy as np
import torch
from common import markdown_table, median, percentile, report, vit_b32_checkpoint
from data_factory import clustered_vectors
from query_latency import captions, milliseconds
from synthetic import DIM, exact_top

from clip_encoder import ClipEncoder
from scan_copy import best_rows

K = 10
TRAINING_ROWS = 65536
# (sub-quantisers of 4 bits, candidates ranked again)
CODES = ((64, 1000), (128, 1000), (128, 5000), (256, 1000), (256, 2000), (256, 3000), (256, 5000))

FirstPass = Callable[[np.ndarray], np.ndarray]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1000000)
    parser.add_argument("--queries", type=int, default=100)
    return parser.parse_args()


def float16_scan(vectors: np.ndarray) -> FirstPass:
    table = torch.from_numpy(vectors).half()
    everything = np.ones(len(vectors), dtype=bool)
    return lambda query: best_rows(table, query, everything, K)


def product_codes(vectors: np.ndarray, subquantisers: int, candidates: int) -> tuple[FirstPass, float]:
    started = time.perf_counter()
    index = faiss.IndexPQFastScan(DIM, subquantisers, 4, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).choice(len(vectors), min(len(vectors), TRAINING_ROWS), replace=False)
    index.train(vectors[sample])
    index.add(vectors)
    return (lambda query: index.search(query[None], candidates)[1][0]), time.perf_counter() - started


def ranked(vectors: np.ndarray, first_pass: FirstPass, query: np.ndarray) -> np.ndarray:
    """The engine's second step: the first pass's candidates ranked by their float32 vectors."""
    candidates = first_pass(query)
    candidates = candidates[candidates >= 0]
    return candidates[np.argsort(-(vectors[candidates] @ query), kind="stable")[:K]]


def measure(
    vectors: np.ndarray, first_pass: FirstPass, queries: np.ndarray
) -> tuple[float, float, list[float]]:
    """Mean and worst recall@10 against exact cosine, and each query's milliseconds."""
    ranked(vectors, first_pass, queries[0])
    recalls, times = [], []
    for query in queries:
        times.append(milliseconds(lambda q=query: ranked(vectors, first_pass, q)))
        found = ranked(vectors, first_pass, query)
        recalls.append(len(set(found.tolist()) & set(exact_top(vectors, query, K).tolist())) / K)
    return float(np.mean(recalls)), min(recalls), times


def main() -> None:
    args = parse_args()
    faiss.omp_set_num_threads(torch.get_num_threads())
    vectors, _ = clustered_vectors(args.size, DIM, clusters=max(20, args.size // 50), seed=args.size)
    texts = ClipEncoder(str(vit_b32_checkpoint()), "cpu").encode_texts(captions(args.queries))
    texts = np.ascontiguousarray(texts, dtype=np.float32)
    images = vectors[np.random.default_rng(1).choice(args.size, args.queries, replace=False)]
    passes = {"float16 scan": (float16_scan(vectors), 0.0, DIM * 2)}
    for subquantisers, candidates in CODES:
        first_pass, seconds = product_codes(vectors, subquantisers, candidates)
        passes[f"PQ {subquantisers}x4 bit, {candidates} ranked"] = (first_pass, seconds, subquantisers // 2)
    rows = []
    for label, (first_pass, seconds, row_bytes) in passes.items():
        text_recall, text_worst, text_ms = measure(vectors, first_pass, texts)
        image_recall, _, image_ms = measure(vectors, first_pass, images)
        rows.append(
            [
                label,
                row_bytes,
                seconds,
                f"{text_recall:.3f} / {text_worst:.1f}",
                f"{image_recall:.3f}",
                median(text_ms),
                percentile(text_ms, 99),
                median(image_ms),
            ]
        )
    headers = [
        "first pass",
        "bytes/image",
        "build s",
        "text recall@10 mean / worst",
        "image recall@10",
        "text p50 ms",
        "text p99 ms",
        "image p50 ms",
    ]
    notes = [
        f"{args.size} synthetic vectors, {args.queries} queries of each kind, faiss {faiss.__version__}, "
        f"{torch.get_num_threads()} threads. Times include the float32 ranking of the candidates "
        "(in-memory vectors here; the engine reads them from its memory-mapped mirror), not the "
        "metadata, thumbnails or HTTP. The engine's codes (product_codes.py) are 256x4 bit with 3000 ranked, "
        "in shards searched side by side; this measures one unsharded index.",
    ]
    report("Compressed first pass against the float16 scan", [markdown_table(headers, rows)], notes)


if __name__ == "__main__":
    main()
