"""Ranking a query against one `StoreView`: candidates, filters, fusion, cuts and near-duplicates.

The engine turns a query into a vector; `Ranker` does the rest over one consistent state of the store
(a search never sees a mirror swapped in halfway), with Chroma's HNSW graph for unfiltered and broad
filtered queries and exact cosine over the mirror for narrow ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from config import Settings
from errors import QueryError, UnknownImage
from filters import Filter, FilterLimits, check_fields, parse_filter
from indexer import SYSTEM_FIELDS
from store import StoreView

MODES = ("vector", "keyword", "hybrid")
# relevance: best match first; taken / -taken: the matching images by date taken, oldest / newest
# first, images without a date last.
SORTS = ("relevance", "taken", "-taken")
MIN_CANDIDATES = 100
# Candidates compared at once by near-duplicate folding; up to FULL_FOLD_MAX candidates are all folded
# (for an exact total), more only until the page is full.
COLLAPSE_BLOCK = 256
FULL_FOLD_MAX = 5000
# Fields a filter may always name, even before any image has them.
FILTER_FIELDS = frozenset({"tags", "description"})


@dataclass
class QueryPart:
    """One part of a query: a text, an image (bytes or a file path), an indexed image's id, or a vector."""

    text: str | None = None
    image: bytes | Path | None = None
    id: str | None = None
    vector: np.ndarray | None = None
    weight: float = 1.0


@dataclass
class SearchQuery:
    parts: list[QueryPart]
    top_k: int | None = None
    offset: int = 0
    min_score: float | None = None
    cutoff: str | None = None
    filters: str | dict[str, Any] | Filter | None = None
    mode: str = "vector"
    collapse_duplicates: bool = True
    sort: str = "relevance"


@dataclass
class Hit:
    id: str
    path: str
    score: float
    rank: int
    metadata: dict[str, Any]
    vector_rank: int | None = None
    keyword_rank: int | None = None
    keyword_score: float | None = None
    matched_terms: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    fused_score: float | None = None

    def as_dict(self, with_why: bool = False) -> dict[str, Any]:
        result = {
            "id": self.id,
            "path": self.path,
            "score": round(self.score, 6),
            "rank": self.rank,
            "metadata": self.metadata,
            "duplicates": self.duplicates,
        }
        if with_why:
            result["why"] = {
                "vector_rank": self.vector_rank,
                "vector_score": round(self.score, 6),
                "keyword_rank": self.keyword_rank,
                "keyword_score": None if self.keyword_score is None else round(self.keyword_score, 6),
                "matched_terms": self.matched_terms,
                "fused_score": None if self.fused_score is None else round(self.fused_score, 6),
            }
        return result


@dataclass
class SearchResult:
    hits: list[Hit]
    mode: str
    has_more: bool
    filtered_total: int | None = None
    note: str | None = None
    total: int | None = None
    total_exact: bool = False
    # Milliseconds by stage ("encode": the query's vector, "rank"), for the Server-Timing header.
    timings: dict[str, float] = field(default_factory=dict)

    def hit_dicts(self) -> list[dict[str, Any]]:
        """The hits as JSON-ready objects; keyword and hybrid hits say why they matched."""
        return [hit.as_dict(with_why=self.mode != "vector") for hit in self.hits]


@dataclass(slots=True)
class _Candidate:
    id: str
    score: float
    vector_rank: int | None = None
    keyword_rank: int | None = None
    keyword_score: float | None = None
    matched_terms: tuple[str, ...] = ()
    fused: float | None = None
    duplicates: list[str] = field(default_factory=list)


def validated_top_k(query: SearchQuery, settings: Settings, dim: int, known: Container[str]) -> int:
    """Check every field of the query (before any model runs); the number of results asked for."""
    top_k = settings.TOP_K if query.top_k is None else query.top_k
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= settings.MAX_TOP_K:
        raise QueryError(f"top_k must be a whole number from 1 to {settings.MAX_TOP_K}")
    if not isinstance(query.offset, int) or not 0 <= query.offset <= settings.MAX_OFFSET:
        raise QueryError(f"offset must be a whole number from 0 to {settings.MAX_OFFSET}")
    if query.mode not in MODES:
        raise QueryError(f"mode must be one of {', '.join(MODES)}")
    if query.sort not in SORTS:
        raise QueryError(f"sort must be one of {', '.join(SORTS)}")
    if query.cutoff not in (None, "none", "adaptive"):
        raise QueryError("cutoff must be 'adaptive' or 'none'")
    if query.min_score is not None and not -1.0 <= query.min_score <= 1.0:
        raise QueryError("min_score must be a number from -1 to 1")
    check_parts(query.parts, settings, dim, known)
    return top_k


def check_parts(parts: list[QueryPart], settings: Settings, dim: int, known: Container[str]) -> None:
    if not parts:
        raise QueryError("the query is empty: give a text, an image or the id of an indexed image")
    if len(parts) > settings.MAX_QUERY_PARTS:
        raise QueryError(f"a query has at most {settings.MAX_QUERY_PARTS} parts")
    for part in parts:
        given = sum(value is not None for value in (part.text, part.image, part.id, part.vector))
        if given != 1:
            raise QueryError("each query part is exactly one of: text, image, id, vector")
        if part.vector is not None and np.shape(part.vector) != (dim,):
            raise QueryError(f"a query vector has {dim} numbers")
        if not isinstance(part.weight, (int, float)) or not np.isfinite(part.weight):
            raise QueryError("a query part's weight must be a finite number")
        if part.text is not None and not part.text.strip():
            raise QueryError("the text query is empty")
        if part.text is not None and len(part.text) > settings.MAX_QUERY_CHARS:
            raise QueryError(f"the text query is longer than {settings.MAX_QUERY_CHARS} characters")
        if part.id is not None and part.id not in known:
            raise UnknownImage(part.id)


def parsed_filter(spec: Any, settings: Settings, field_names: frozenset[str]) -> Filter | None:
    """The parsed filter, checked against the fields the indexed images have (none checked when the
    index is empty)."""
    limits = FilterLimits(settings.MAX_FILTER_CHARS, settings.MAX_FILTER_VALUES)
    image_filter = parse_filter(spec, limits)
    if image_filter is not None and field_names:
        check_fields(image_filter, field_names | SYSTEM_FIELDS | FILTER_FIELDS)
    return image_filter


def keyword_text_of(parts: list[QueryPart]) -> str:
    """The words keyword ranking looks for: the texts of the parts with a positive weight."""
    return " ".join(part.text for part in parts if part.text and part.weight > 0)


def no_words_note(mode: str) -> str:
    """Why a query without (positive) text was ranked by vector although `mode` was asked for."""
    return f"no text in the query, so it is ranked by vector similarity ({mode} ranking needs words)"


def rankable(query: SearchQuery) -> tuple[SearchQuery, str | None]:
    """The query as it can be ranked, and a note when its mode had to change (see `no_words_note`)."""
    if query.mode == "vector" or keyword_text_of(query.parts).strip():
        return query, None
    return dataclasses.replace(query, mode="vector"), no_words_note(query.mode)


class Ranker:
    """The ranking of one query, by its vector, over one state of the store."""

    def __init__(
        self,
        view: StoreView,
        settings: Settings,
        query: SearchQuery,
        vector: np.ndarray,
        image_filter: Filter | None,
    ) -> None:
        self.view = view
        self.catalog = view.catalog
        self.settings = settings
        self.query = query
        self.vector = vector
        self.keyword_text = keyword_text_of(query.parts)
        self.exclude = frozenset(part.id for part in query.parts if part.id is not None)
        self.mask = self.catalog.mask(image_filter) if image_filter else None

    def result(self, top_k: int, note: str | None = None) -> SearchResult:
        query = self.query
        need = query.offset + top_k
        if query.sort == "relevance":
            ranked, exhausted = self._ranked_by_relevance(need)
            count = len(ranked)
        else:
            ranked, count = self._ranked_by_date(need)
            exhausted = not query.collapse_duplicates  # else only the first pages are collapsed
        page = [candidate for candidate in ranked[query.offset : need] if candidate.id in self.catalog]
        metadatas = self.catalog.metadatas([candidate.id for candidate in page])
        hits = [
            self._hit(candidate, query.offset + i + 1, metadata or {})
            for i, (candidate, metadata) in enumerate(zip(page, metadatas, strict=True))
        ]
        filtered_total = int(np.count_nonzero(self.mask)) if self.mask is not None else None
        total, exact = self._total(count, exhausted, filtered_total)
        return SearchResult(hits, query.mode, count > need, filtered_total, note, total, exact)

    def _ranked_by_relevance(self, need: int) -> tuple[list[_Candidate], bool]:
        """The best matches (at least `need` + 1 when there are that many), and whether that is all."""
        fetch = max(self._candidate_pool(), 3 * need)
        while True:
            candidates, exhausted = self._candidates(fetch)
            fold_all = exhausted and len(candidates) <= FULL_FOLD_MAX  # then the total is exact
            ranked = self._refine(candidates, need=None if fold_all else need)
            if len(ranked) > need or exhausted:
                return ranked, exhausted and (fold_all or not self.query.collapse_duplicates)
            fetch *= 4

    def _ranked_by_date(self, need: int) -> tuple[list[_Candidate], int]:
        """The first `need` + 1 of every match (filter, keyword match, min_score and cutoff applied) by
        date taken, undated last, relevance breaking ties; and how many there are (with duplicates
        collapsed: how many were kept, at most `need` + 1)."""
        matching = self._all_matches()
        taken = self.catalog.numbers(matching.rows, "taken")
        sign = -1.0 if self.query.sort.startswith("-") else 1.0
        undated = np.isnan(taken)
        order = np.lexsort((np.arange(len(matching)), np.where(undated, 0.0, sign * taken), undated))
        by_date = matching.reordered(order)
        if not self.query.collapse_duplicates:
            return [by_date.candidate(i) for i in range(min(need + 1, len(by_date)))], len(by_date)
        kept = self._collapse(by_date, need, self.query.offset)
        return kept, len(kept)

    def _all_matches(self) -> _Matches:
        """Every match of the mode, best first, by exact cosine (no graph query of the whole index),
        with the relevance cuts applied."""
        mode = self.query.mode
        if mode == "vector":
            ids_by_row, rows, scores = self.catalog.ranked_rows(self.vector, self.mask, self.exclude)
            keep = self._kept_by_score(scores)
            return _Matches.of_scores(ids_by_row, rows[keep], scores[keep])
        candidates = self._keyword_candidates()
        if mode == "hybrid":
            ids_by_row, rows, scores = self.catalog.ranked_rows(self.vector, self.mask, self.exclude)
            by_vector = [
                _Candidate(ids_by_row[row], score, vector_rank=rank)
                for rank, (row, score) in enumerate(zip(rows.tolist(), scores.tolist(), strict=True), 1)
            ]
            candidates = _fuse(by_vector, candidates, self.settings.HYBRID_RRF_K)
        matching = self._refine(candidates, collapse=False)
        return _Matches.of_candidates(
            matching, self.catalog.rows_of([candidate.id for candidate in matching])
        )

    def _total(self, count: int, exhausted: bool, filtered_total: int | None) -> tuple[int | None, bool]:
        """How many results the query has in all: exact when every candidate (`count`) was ranked, else
        an estimate where the vector ranking keeps every selected image (no score cut), else unknown."""
        query = self.query
        if exhausted:
            return count, True
        if query.mode == "vector" and query.min_score is None and query.cutoff != "adaptive":
            selected = len(self.catalog) if filtered_total is None else filtered_total
            return max(count, selected - len(self.exclude)), False
        return None, False

    def _candidate_pool(self) -> int:
        """How many candidates a query starts with: the adaptive cutoff and rank fusion need a pool."""
        if self.query.cutoff == "adaptive" or self.query.mode != "vector":
            return MIN_CANDIDATES
        return 0

    def _candidates(self, fetch: int) -> tuple[list[_Candidate], bool]:
        """The best `fetch` candidates of the mode, best first, and whether there are no more."""
        mode = self.query.mode
        if mode == "vector":
            return self._vector_candidates(fetch)
        keyword = self._keyword_candidates()
        if mode == "keyword":
            return keyword[:fetch], len(keyword) <= fetch
        ranked, exhausted = self._vector_candidates(fetch)
        return _fuse(ranked, keyword, self.settings.HYBRID_RRF_K)[:fetch], exhausted and len(keyword) <= fetch

    def _vector_candidates(self, fetch: int) -> tuple[list[_Candidate], bool]:
        total = len(self.catalog) if self.mask is None else int(self.mask.sum())
        scored = self._graph_candidates(total, fetch) if total > self.settings.EXACT_SEARCH_MAX else None
        if scored is None:
            scored = self.catalog.exact_top(self.vector, self.mask, fetch, self.exclude)
        candidates = [
            _Candidate(image_id, score, vector_rank=rank)
            for rank, (image_id, score) in enumerate(scored[:fetch], start=1)
        ]
        return candidates, fetch >= total - len(self.exclude)

    def _graph_candidates(self, total: int, fetch: int) -> list[tuple[str, float]] | None:
        """The HNSW graph's candidates, for more images than are ranked exactly; None where a filter
        left too few of them."""
        if self.mask is None:
            return self._hnsw(fetch + len(self.exclude))
        return self._hnsw_filtered(total, fetch)

    def _hnsw(self, count: int) -> list[tuple[str, float]]:
        """The graph's nearest images (the query's own ids left out), by exact cosine."""
        found = self.view.nearest(self.vector, count, self.settings)
        ids = [image_id for image_id in found if image_id not in self.exclude]
        scores = self.catalog.scores(ids, self.vector)
        order = np.lexsort((np.arange(len(ids)), -scores))
        return [(ids[i], float(scores[i])) for i in order]

    def _hnsw_filtered(self, selected: int, fetch: int) -> list[tuple[str, float]] | None:
        """A broad filter: over-fetch from the graph and keep matches; None if too few came back."""
        assert self.mask is not None
        total = len(self.catalog)
        count = min(total, int(fetch * total / selected * 2) + 50 + len(self.exclude))
        found = self._hnsw(count)
        keep = self.catalog.selected([image_id for image_id, _ in found], self.mask)
        scored = [item for item, kept in zip(found, keep, strict=True) if kept]
        return scored if len(scored) >= min(fetch, selected - len(self.exclude)) else None

    def _keyword_candidates(self) -> list[_Candidate]:
        hits = [hit for hit in self.catalog.keywords.search(self.keyword_text) if hit.id not in self.exclude]
        if self.mask is not None:
            keep = self.catalog.selected([hit.id for hit in hits], self.mask)
            hits = [hit for hit, kept in zip(hits, keep, strict=True) if kept]
        scores = self.catalog.scores([hit.id for hit in hits], self.vector)
        return [
            _Candidate(
                hit.id,
                float(score),
                keyword_rank=rank,
                keyword_score=hit.score,
                matched_terms=hit.matched_terms,
            )
            for rank, (hit, score) in enumerate(zip(hits, scores, strict=True), start=1)
        ]

    def _refine(
        self, candidates: list[_Candidate], collapse: bool = True, need: int | None = None
    ) -> list[_Candidate]:
        """Relevance cuts and near-duplicate collapse, applied in rank order (so pages stay stable)."""
        query = self.query
        if query.min_score is not None or query.cutoff == "adaptive":
            keep = self._kept_by_score(np.array([candidate.score for candidate in candidates]))
            candidates = [candidates[i] for i in np.flatnonzero(keep).tolist()]
        if collapse and query.collapse_duplicates and len(candidates) > 1:
            matches = _Matches.of_candidates(candidates, self.catalog.rows_of([c.id for c in candidates]))
            candidates = self._collapse(matches, need, query.offset)
        return candidates

    def _kept_by_score(self, scores: np.ndarray) -> np.ndarray:
        """Which of these scores (in rank order) pass min_score, then the adaptive cutoff."""
        query = self.query
        scores = scores.astype(np.float64)  # compared as the candidates' Python floats are
        keep = np.ones(len(scores), dtype=bool)
        if query.min_score is not None:
            keep &= scores >= query.min_score
        if query.cutoff == "adaptive" and keep.any():
            keep &= scores >= adaptive_threshold(scores[keep][:MIN_CANDIDATES].tolist(), self.settings)
        return keep

    def _collapse(self, matches: _Matches, need: int | None = None, offset: int = 0) -> list[_Candidate]:
        """Near-duplicates folded into the best of them, in rank order (so pages stay stable).

        A match is kept unless it lies within DUPLICATE_THRESHOLD of a hit kept before it. Matches are
        compared block by block with the kept hits only, never all pairs: memory is O(block x kept).
        Once `need` + 1 hits are kept (enough for the page and `has_more`), the remaining matches are
        only matched with the page's hits (from `offset`), in one pass over their vectors
        (`Catalog.twins`), to list them as those hits' duplicates.
        """
        limit = len(matches) if need is None else need + 1
        kept = _KeptHits(self.catalog.dim, min(limit, len(matches)), self.settings.DUPLICATE_THRESHOLD)
        position = 0
        while position < len(matches) and len(kept) < limit:
            ids = matches.ids(position, position + COLLAPSE_BLOCK)
            block = self.catalog.vectors(ids, missing_ok=True)
            for index, twin in kept.fold(block, limit - len(kept)):
                if twin is None:
                    kept.rows.append(position + index)
                else:
                    matches.candidate(kept.rows[twin]).duplicates.append(ids[index])
            position += min(len(block), kept.scanned)
        if need is not None and position < len(matches) and offset < len(kept) - 1:
            page = [matches.candidate(i) for i in kept.rows[offset : limit - 1]]
            self._attach_duplicates(matches, position, page, kept.vectors[offset : limit - 1])
        return [matches.candidate(i) for i in kept.rows]

    def _attach_duplicates(
        self, matches: _Matches, start: int, page: list[_Candidate], page_vectors: np.ndarray
    ) -> None:
        """List each match from `start` on under the first page hit it nearly duplicates."""
        found, first = self.catalog.twins(
            matches.rows[start:], page_vectors, self.settings.DUPLICATE_THRESHOLD
        )
        for index, hit in zip(found.tolist(), first.tolist(), strict=True):
            page[hit].duplicates.append(matches.id(start + index))

    def _hit(self, candidate: _Candidate, rank: int, metadata: dict[str, Any]) -> Hit:
        return Hit(
            id=candidate.id,
            path=metadata.get("path", ""),
            score=candidate.score,
            rank=rank,
            metadata=metadata,
            vector_rank=candidate.vector_rank,
            keyword_rank=candidate.keyword_rank,
            keyword_score=candidate.keyword_score,
            matched_terms=list(candidate.matched_terms),
            duplicates=list(candidate.duplicates),
            fused_score=candidate.fused,
        )


class _Matches:
    """Matches in one order, held as mirror rows; a match's id is looked up and its candidate made only
    when asked for, so that a query ordering a million images makes a page of objects, not a million."""

    def __init__(
        self, rows: np.ndarray, id_of: Callable[[int], str], make: Callable[[int], _Candidate]
    ) -> None:
        self.rows = rows
        self.id = id_of
        self._make = make
        self._made: dict[int, _Candidate] = {}

    @classmethod
    def of_candidates(cls, candidates: list[_Candidate], rows: np.ndarray) -> _Matches:
        for candidate in candidates:
            candidate.duplicates = []
        return cls(rows, lambda i: candidates[i].id, candidates.__getitem__)

    @classmethod
    def of_scores(cls, ids_by_row: list[str], rows: np.ndarray, scores: np.ndarray) -> _Matches:
        """Matches best first by vector, with those scores; `ids_by_row` names the image in each row."""

        def id_of(index: int) -> str:
            return ids_by_row[rows[index]]

        return cls(rows, id_of, lambda i: _Candidate(id_of(i), float(scores[i]), vector_rank=i + 1))

    def __len__(self) -> int:
        return len(self.rows)

    def ids(self, start: int, stop: int) -> list[str]:
        return [self.id(index) for index in range(start, min(stop, len(self)))]

    def candidate(self, index: int) -> _Candidate:
        made = self._made.get(index)
        if made is None:
            made = self._made[index] = self._make(index)
        return made

    def reordered(self, order: np.ndarray) -> _Matches:
        """The same matches (the same candidates) in the order of these indices."""
        return _Matches(
            self.rows[order], lambda i: self.id(int(order[i])), lambda i: self.candidate(int(order[i]))
        )


class _KeptHits:
    """The hits kept so far by duplicate folding: their match positions and vectors."""

    def __init__(self, dim: int, capacity: int, threshold: float) -> None:
        self.rows: list[int] = []
        self.threshold = threshold
        self.scanned = 0
        self.vectors = np.zeros((capacity, dim), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def fold(self, block: np.ndarray, room: int) -> list[tuple[int, int | None]]:
        """For each vector of the block in order: (its index, the kept hit it duplicates or None).

        Stops after `room` new hits are kept; `scanned` says how many of the block were looked at.
        """
        before = len(self.rows)
        against_kept = block @ self.vectors[:before].T >= self.threshold
        within = block @ block.T >= self.threshold
        new: list[int] = []
        outcome: list[tuple[int, int | None]] = []
        for index in range(len(block)):
            if len(new) >= room:
                break
            earlier = np.flatnonzero(against_kept[index])
            inside = [k for k, local in enumerate(new) if within[index, local]]
            if earlier.size:
                outcome.append((index, int(earlier[0])))
            elif inside:
                outcome.append((index, before + inside[0]))
            else:
                self.vectors[before + len(new)] = block[index]
                new.append(index)
                outcome.append((index, None))
        self.scanned = len(outcome)
        return outcome


def adaptive_threshold(scores: list[float], settings: Settings) -> float:
    """Keep hits within ADAPTIVE_CUTOFF_RATIO of the way from the best score down to the median.

    The pool is the query's first MIN_CANDIDATES candidates, so the rule is per query: a query whose
    best hit stands far above the rest keeps only the hits near it.
    """
    pool = np.asarray(scores[:MIN_CANDIDATES], dtype=np.float64)
    best, median = float(pool.max()), float(np.median(pool))
    return best - settings.ADAPTIVE_CUTOFF_RATIO * (best - median)


def _fuse(vector: list[_Candidate], keyword: list[_Candidate], k: int) -> list[_Candidate]:
    """Reciprocal rank fusion: each list adds 1 / (k + rank); best fused score first."""
    fused: dict[str, _Candidate] = {}
    for candidate in vector:
        fused[candidate.id] = candidate
        candidate.fused = 1.0 / (k + candidate.vector_rank)
    for candidate in keyword:
        entry = fused.setdefault(candidate.id, candidate)
        if entry is not candidate:
            entry.keyword_rank = candidate.keyword_rank
            entry.keyword_score = candidate.keyword_score
            entry.matched_terms = candidate.matched_terms
        entry.fused = (entry.fused or 0.0) + 1.0 / (k + candidate.keyword_rank)
    return sorted(fused.values(), key=lambda candidate: (-candidate.fused, -candidate.score, candidate.id))
