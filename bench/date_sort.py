"""Benchmark 4c: text queries sorted by date taken against the same queries by relevance, in process.

    python bench/date_sort.py [--size 100000] [--queries 5]

A query sorted by date (`sort: taken` or `-taken`) ranks every match, not a page of the best: every
match is scored exactly and ordered by its `taken` (a column of the mirror, columns.py, read once per
engine and kept), the first `top_k` + 1 are folded for near-duplicates and the rest matched with the
page's hits in one pass over the vectors (ranking.py, `Ranker._collapse`). This times such queries on
the synthetic collection of bench/scale.py, the first one apart, against the same captions by
relevance. Its images have no `taken` field: the first query finds the field held by no image and
reads nothing, and every image is undated, so the relevance order decides. In a dated library the
first query also reads the field (as a filter's first use on `modified` does, bench/scale.py).
"""

from __future__ import annotations

import argparse
import time

from common import markdown_table, median, report
from query_latency import captions
from synthetic import synthetic_collection

from image_retrieval import ImageRetrieval

TOP_K = 20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000, help="images in the synthetic collection")
    parser.add_argument("--queries", type=int, default=5, help="queries of each kind after the first")
    return parser.parse_args()


def milliseconds(engine: ImageRetrieval, text: str, sort: str) -> float:
    started = time.perf_counter()
    engine.search_text(text, sort=sort, top_k=TOP_K)
    return (time.perf_counter() - started) * 1000


def main() -> None:
    args = parse_args()
    texts = captions(args.queries + 2)
    with ImageRetrieval(synthetic_collection(args.size).settings()) as engine:
        milliseconds(engine, texts[0], "relevance")  # the model's and the mirror's first use
        first = milliseconds(engine, texts[1], "taken")
        timings: dict[str, list[float]] = {"relevance": [], "taken": [], "-taken": []}
        for text in texts[2:]:
            for sort, times in timings.items():
                times.append(milliseconds(engine, text, sort))
    relevance = median(timings["relevance"])
    rows = [[args.size, "taken, first query", 1, first, first / relevance]]
    rows += [
        [args.size, sort, len(times), median(times), median(times) / relevance]
        for sort, times in timings.items()
    ]
    report(
        "Text queries sorted by date taken",
        [markdown_table(["images", "sort", "queries", "p50 ms", "x relevance"], rows)],
        [
            f"In process (`ImageRetrieval.search_text`, top {TOP_K}), text encoding included; the three "
            "sorts of each caption one after the other."
        ],
        "ViT-B/32 architecture (512-d)",
    )


if __name__ == "__main__":
    main()
