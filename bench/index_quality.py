"""Benchmark 3: recall@10 of the engine's and of raw Chroma's answers against exact cosine search.

    python bench/index_quality.py [--sizes 10000 100000] [--queries 200]

Collections of 10k and 100k clustered 512-d vectors (bench/synthetic.py), queried unfiltered and
with filters keeping 50%, 10% and 1% of the images. Two kinds of query: more-like-this (a stored
vector; it lies inside a cluster) and text encoded by the ViT-B/32-architecture model (random
weights, so a direction unrelated to the clusters: the hard case for a graph index). Target:
recall@10 >= 0.99 everywhere.
"""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
from common import COCO_MINI, Stopwatch, markdown_table, percentile, report
from synthetic import (
    SELECTIVITY_FILTERS,
    SyntheticCollection,
    exact_top,
    synthetic_collection,
)

from image_retrieval import ImageRetrieval, QueryPart, SearchQuery

K = 10
TARGET = 0.99


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--queries", type=int, default=200, help="queries of each kind")
    parser.add_argument(
        "--ef-search", type=int, help="HNSW ef_search to store in the collections (default: HNSW_EF_SEARCH)"
    )
    return parser.parse_args()


def captions(count: int) -> list[str]:
    annotations = json.loads((COCO_MINI / "annotations.json").read_text())
    texts = [caption for entry in annotations for caption in entry["captions"]]
    return texts[:: max(1, len(texts) // count)][:count]


def bucket_limit(spec: str | None) -> int | None:
    return None if spec is None else int(spec.split("<")[1])


def engine_path(engine: ImageRetrieval, kept: int, spec: str | None) -> str:
    if kept <= engine.settings.EXACT_SEARCH_MAX:
        return "exact (mirror)"
    return "HNSW" if spec is None else "HNSW over-fetch + post-filter"


def recall(found: list[str], truth: list[str]) -> float:
    return len(set(found[:K]) & set(truth[:K])) / K


def measure(
    engine: ImageRetrieval,
    collection: SyntheticCollection,
    spec: str | None,
    queries: list[tuple[QueryPart, np.ndarray]],
) -> tuple[float, float, float]:
    """(engine recall@10, raw Chroma recall@10) averaged over the queries, and raw Chroma's p50 ms."""
    limit = bucket_limit(spec)
    mask = None if limit is None else collection.mask(limit)
    where = None if limit is None else {"bucket": {"$lt": limit}}
    index_of = {image_id: i for i, image_id in enumerate(collection.ids)}
    engine_recalls, chroma_recalls, chroma_ms = [], [], []
    for part, vector in queries:
        allowed = np.ones(collection.size, bool) if mask is None else mask.copy()
        if part.id is not None:
            allowed[index_of[part.id]] = False
        truth = [collection.ids[i] for i in exact_top(collection.vectors, vector, K, allowed)]
        result = engine.search(SearchQuery([part], top_k=K, filters=spec, collapse_duplicates=False))
        engine_recalls.append(recall([hit.id for hit in result.hits], truth))
        with Stopwatch() as watch:
            raw = engine.store.view().collection.query(
                query_embeddings=[vector], n_results=K + 1, where=where, include=[]
            )
        chroma_ms.append(watch.seconds * 1000)
        chroma_recalls.append(recall([i for i in raw["ids"][0] if i != part.id], truth))
    return float(np.mean(engine_recalls)), float(np.mean(chroma_recalls)), percentile(chroma_ms, 50)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(7)
    rows = []
    for size in args.sizes:
        collection = synthetic_collection(size)
        ef_search = args.ef_search or collection.settings().HNSW_EF_SEARCH
        with ImageRetrieval(collection.settings(HNSW_EF_SEARCH=ef_search), role="bench") as engine:
            parts = {
                "more-like-this": [
                    QueryPart(id=collection.ids[i]) for i in rng.choice(size, args.queries, replace=False)
                ],
                "text": [QueryPart(text=text) for text in captions(args.queries)],
            }
            kinds = {
                kind: [(part, engine.query_vector([part])) for part in kind_parts]
                for kind, kind_parts in parts.items()
            }
            for label, spec in {"none": None, **SELECTIVITY_FILTERS}.items():
                limit = bucket_limit(spec)
                kept = size if limit is None else int(collection.mask(limit).sum())
                path = engine_path(engine, kept, spec)
                for kind, queries in kinds.items():
                    engine_recall, chroma_recall, chroma_ms = measure(engine, collection, spec, queries)
                    rows.append(
                        [
                            size,
                            ef_search,
                            label,
                            kept,
                            kind,
                            len(queries),
                            path,
                            engine_recall,
                            chroma_recall,
                            chroma_ms,
                        ]
                    )
                    print(rows[-1], flush=True)
    settings = collection.settings()
    worst = min(row[7] for row in rows)
    table = markdown_table(
        [
            "images",
            "ef_search",
            "filter",
            "kept",
            "query",
            "queries",
            "engine path",
            "engine R@10",
            "raw Chroma R@10",
            "raw Chroma p50 ms",
        ],
        rows,
    )
    notes = [
        f"HNSW built with M={settings.HNSW_M}, ef_construction={settings.HNSW_EF_CONSTRUCTION}; "
        f"EXACT_SEARCH_MAX={settings.EXACT_SEARCH_MAX}.",
        "`raw Chroma p50 ms`: one `collection.query` (10 results; filtered rows use Chroma's `where`), "
        "in process, without the model; it shows what ef_search costs.",
        f"Worst engine recall@10: {worst:.3f} "
        f"(target >= {TARGET}: {'met' if worst >= TARGET else 'MISSED'}).",
    ]
    report("Index quality: recall@10 against exact cosine", [table], notes, "ViT-B/32 architecture (512-d)")


if __name__ == "__main__":
    main()
