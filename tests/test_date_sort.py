"""Sorting by date taken against the relevance order and a plain fold of near-duplicates.

A query sorted by date orders every match as arrays (ranking._Matches) and finds the page's
near-duplicates in one pass over the rows (Catalog.twins). These tests hold it to two independent
statements: without collapsing, it is the relevance order of every match, stably sorted by date; with
collapsing, it is that date order folded one match at a time, as the docstring of `Ranker._collapse`
states it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from conftest import make_settings

from image_retrieval import ImageRetrieval, QueryPart, SearchQuery, SearchResult

THRESHOLD = 0.97
IMAGES = 150
GROUPS = 50


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_checkpoint):
    """Groups of near-duplicate vectors (cosine >= THRESHOLD within a group), each image with a date
    taken that is a number (ties included), a text, a boolean or absent, and a word or two."""
    tmp_path = tmp_path_factory.mktemp("dated")
    dataset = tmp_path / "empty"
    dataset.mkdir()
    settings = make_settings(tmp_path, dataset, tiny_checkpoint, DUPLICATE_THRESHOLD=THRESHOLD)
    with ImageRetrieval(settings) as engine:
        rng = np.random.default_rng(11)
        dim = engine.encoder.dim
        centres = rng.standard_normal((GROUPS, dim)).astype(np.float32)
        group = np.concatenate([np.arange(GROUPS), rng.integers(0, GROUPS, IMAGES - GROUPS)])
        vectors = centres[group] + 0.08 * rng.standard_normal((IMAGES, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = [f"img{i:03d}" for i in range(IMAGES)]
        metadatas = [_metadata(image_id, rng) for image_id in ids]
        engine.store.write(ids, vectors, metadatas)
        twins = vectors @ vectors.T >= THRESHOLD
        assert (twins.sum(axis=1) > 1).sum() > IMAGES // 2, "the library must hold near-duplicates"
        yield engine, dict(zip(ids, vectors, strict=True))


def _metadata(image_id: str, rng: np.random.Generator) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "path": f"{image_id}.jpg",
        "name": f"{image_id}.jpg",
        "folder": "",
        "description": " ".join(rng.choice(["harbour", "market", "forest", "bridge"], 2).tolist()),
        "part": int(rng.integers(0, 3)),
    }
    kind = rng.integers(0, 10)
    if kind < 6:
        metadata["taken"] = float(rng.integers(0, 20)) * 86400.0 + 1.6e9  # ties: 20 days for 150 images
    elif kind == 6:
        metadata["taken"] = "unknown"
    elif kind == 7:
        metadata["taken"] = True
    return metadata


def _search(engine: ImageRetrieval, query: np.ndarray, **options: Any) -> SearchResult:
    text = options.pop("text", None)
    parts = [QueryPart(vector=query)] if text is None else [QueryPart(text=text)]
    return engine.search(SearchQuery(parts, **options))


def _date_key(metadata: dict[str, Any], newest_first: bool) -> tuple[bool, float]:
    taken = metadata.get("taken")
    if isinstance(taken, bool) or not isinstance(taken, int | float) or math.isnan(taken):
        return True, 0.0
    return False, -taken if newest_first else taken


def _by_date(engine: ImageRetrieval, query: np.ndarray, sort: str, **options: Any) -> list[str]:
    """Every match in relevance order (no folding), stably sorted by date taken, undated last."""
    everything = _search(engine, query, top_k=200, collapse_duplicates=False, **options)
    assert not everything.has_more
    keyed = [(_date_key(hit.metadata, sort == "-taken"), hit.id) for hit in everything.hits]
    return [image_id for _, image_id in sorted(keyed, key=lambda pair: pair[0])]


def _folded(
    ordered: list[str], vectors: dict[str, np.ndarray], need: int, offset: int
) -> dict[str, list[str]]:
    """Each kept match of the page (from `offset`, up to `need`) with its duplicates, folded one at a
    time: a match joins the first kept hit it nearly duplicates, else is kept; once `need` + 1 are
    kept, the rest only join the page's hits."""
    kept: dict[str, list[str]] = {}
    for image_id in ordered:
        if len(kept) > need:
            page = list(kept)[offset:need]
            twin = next((hit for hit in page if vectors[hit] @ vectors[image_id] >= THRESHOLD), None)
        else:
            twin = next((hit for hit in kept if vectors[hit] @ vectors[image_id] >= THRESHOLD), None)
        if twin is not None:
            kept[twin].append(image_id)
        elif len(kept) <= need:
            kept[image_id] = []
    return {image_id: kept[image_id] for image_id in list(kept)[offset:need]}


QUERIES = [
    {},
    {"filters": "part < 2"},
    {"min_score": 0.0},
    {"cutoff": "adaptive"},
    {"mode": "keyword", "text": "harbour"},
    {"mode": "hybrid", "text": "market"},
]


@pytest.mark.parametrize("sort", ["taken", "-taken"])
@pytest.mark.parametrize("options", QUERIES, ids=lambda options: ",".join(options) or "plain")
def test_a_date_order_is_the_relevance_order_sorted_by_date(library, sort, options):
    engine, _ = library
    query = np.random.default_rng(5).standard_normal(engine.encoder.dim).astype(np.float32)
    expected = _by_date(engine, query, sort, **options)
    assert len(expected) > 20
    for top_k, offset in [(200, 0), (7, 0), (7, 14)]:
        found = _search(
            engine, query, sort=sort, top_k=top_k, offset=offset, collapse_duplicates=False, **options
        )
        assert [hit.id for hit in found.hits] == expected[offset : offset + top_k]
        assert [hit.rank for hit in found.hits] == list(range(offset + 1, offset + 1 + len(found.hits)))
        assert found.has_more == (len(expected) > offset + top_k)
        assert (found.total, found.total_exact) == (len(expected), True)


@pytest.mark.parametrize("sort", ["taken", "-taken"])
@pytest.mark.parametrize("options", QUERIES, ids=lambda options: ",".join(options) or "plain")
def test_a_date_order_folds_near_duplicates_one_match_at_a_time(library, sort, options):
    engine, vectors = library
    rng = np.random.default_rng(len(options))
    query = list(vectors.values())[int(rng.integers(IMAGES))]
    ordered = _by_date(engine, query, sort, **options)
    for top_k, offset in [(5, 0), (4, 4), (200, 0)]:
        need = offset + top_k
        found = _search(engine, query, sort=sort, top_k=top_k, offset=offset, **options)
        expected = _folded(ordered, vectors, need, offset)
        assert [hit.id for hit in found.hits] == list(expected)
        assert {hit.id: hit.duplicates for hit in found.hits} == expected
    assert any(hit.duplicates for hit in _search(engine, query, sort=sort, top_k=20, **options).hits)


def test_a_vector_date_order_keeps_each_matchs_score_and_rank(library):
    engine, vectors = library
    query = vectors["img007"]
    by_relevance = _search(engine, query, top_k=200, collapse_duplicates=False)
    rank_and_score = {hit.id: (hit.vector_rank, hit.score) for hit in by_relevance.hits}
    by_date = _search(engine, query, sort="taken", top_k=200, collapse_duplicates=False)
    assert {hit.id: (hit.vector_rank, hit.score) for hit in by_date.hits} == rank_and_score
    assert rank_and_score["img007"] == (1, pytest.approx(1.0, abs=1e-5))
