"""The in-memory mirror of a collection: vectors and metadata by id, for exact and filtered ranking.

Chroma stays the store of record and answers unfiltered nearest-neighbour queries from its HNSW
graph; this mirror answers what the graph cannot do well: filters, exact cosine over a subset,
vectors by id (more like this, duplicate collapse) and keyword search.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np

from filters import Filter
from keywords import KeywordIndex

MASK_CACHE_SIZE = 32


class Catalog:
    """Vectors in one growing matrix (rows reused after deletes) and metadata per row; thread-safe."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.keywords = KeywordIndex()
        self._lock = threading.RLock()
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._alive = np.zeros(0, dtype=bool)
        self._ids: list[str | None] = []
        self._metas: list[dict[str, Any] | None] = []
        self._rows: dict[str, int] = {}
        self._free: list[int] = []
        self._version = 0
        self._masks: OrderedDict[str, tuple[int, np.ndarray]] = OrderedDict()
        self._field_counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._rows

    def put(
        self, ids: list[str], vectors: np.ndarray, metadatas: list[dict[str, Any]], keywords: bool = True
    ) -> None:
        with self._lock:
            self._reserve(sum(1 for image_id in ids if image_id not in self._rows))
            for image_id, vector, metadata in zip(ids, vectors, metadatas, strict=True):
                row = self._rows.get(image_id)
                if row is None:
                    row = self._free.pop()
                    self._rows[image_id] = row
                    self._ids[row] = image_id
                    self._alive[row] = True
                self._vectors[row] = vector
                self._set_metadata(row, metadata)
            self._version += 1
        if keywords:
            self.keywords.put(list(zip(ids, metadatas, strict=True)))

    def update_metadata(self, ids: list[str], metadatas: list[dict[str, Any]]) -> None:
        """Replace the metadata of the images this mirror has (others are skipped)."""
        with self._lock:
            known = [(i, m) for i, m in zip(ids, metadatas, strict=True) if i in self._rows]
            for image_id, metadata in known:
                self._set_metadata(self._rows[image_id], metadata)
            self._version += 1
        self.keywords.put(known)

    def remove(self, ids: Iterable[str]) -> None:
        ids = [image_id for image_id in ids if image_id in self._rows]
        with self._lock:
            for image_id in ids:
                row = self._rows.pop(image_id)
                self._alive[row] = False
                self._ids[row] = None
                self._field_counts.subtract((self._metas[row] or {}).keys())
                self._metas[row] = None
                self._free.append(row)
            self._version += 1
        self.keywords.remove(ids)

    def _set_metadata(self, row: int, metadata: dict[str, Any]) -> None:
        self._field_counts.subtract((self._metas[row] or {}).keys())
        self._metas[row] = dict(metadata)
        self._field_counts.update(metadata.keys())

    def field_names(self) -> frozenset[str]:
        """The metadata fields that at least one image has."""
        with self._lock:
            return frozenset(name for name, count in self._field_counts.items() if count > 0)

    def _reserve(self, extra: int) -> None:
        missing = extra - len(self._free)
        if missing <= 0:
            return
        old = len(self._ids)
        size = max(old + missing, int(old * 1.5), 1024)
        vectors = np.zeros((size, self.dim), dtype=np.float32)
        vectors[:old] = self._vectors
        alive = np.zeros(size, dtype=bool)
        alive[:old] = self._alive
        self._vectors, self._alive = vectors, alive
        self._ids.extend([None] * (size - old))
        self._metas.extend([None] * (size - old))
        self._free.extend(range(size - 1, old - 1, -1))

    def metadata(self, image_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._rows.get(image_id)
            return None if row is None else dict(self._metas[row])

    def vector(self, image_id: str) -> np.ndarray | None:
        with self._lock:
            row = self._rows.get(image_id)
            return None if row is None else self._vectors[row].copy()

    def vectors(self, ids: list[str], missing_ok: bool = False) -> np.ndarray:
        """The vectors of the images; with `missing_ok`, a zero vector for an id removed meanwhile."""
        with self._lock:
            if not missing_ok:
                return self._vectors[[self._rows[image_id] for image_id in ids]].copy()
            rows = [self._rows.get(image_id, -1) for image_id in ids]
            vectors = self._vectors[rows] if rows else np.zeros((0, self.dim), dtype=np.float32)
            vectors[[i for i, row in enumerate(rows) if row < 0]] = 0.0
            return vectors

    def values(self, ids: list[str], key: str) -> list[Any]:
        """The metadata field `key` of each image (None where absent or removed meanwhile)."""
        with self._lock:
            rows = [self._rows.get(image_id) for image_id in ids]
            return [None if row is None else self._metas[row].get(key) for row in rows]

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return [(image_id, dict(self._metas[row])) for image_id, row in self._rows.items()]

    def mask(self, image_filter: Filter | None) -> np.ndarray:
        """Which rows are live images matching the filter."""
        with self._lock:
            if image_filter is None:
                return self._alive.copy()
            cached = self._masks.get(image_filter.key)
            if cached and cached[0] == self._version:
                self._masks.move_to_end(image_filter.key)
                return cached[1]
            mask = np.zeros(len(self._ids), dtype=bool)
            for row in self._rows.values():
                mask[row] = image_filter.matches(self._metas[row])
            self._masks[image_filter.key] = (self._version, mask)
            while len(self._masks) > MASK_CACHE_SIZE:
                self._masks.popitem(last=False)
            return mask

    def selected(self, ids: list[str], mask: np.ndarray) -> list[bool]:
        """Whether each id is an image whose row `mask` selects."""
        with self._lock:
            rows = [self._rows.get(image_id) for image_id in ids]
            return [row is not None and row < len(mask) and bool(mask[row]) for row in rows]

    def exact_top(
        self, query: np.ndarray, mask: np.ndarray, count: int, exclude: frozenset[str] = frozenset()
    ) -> list[tuple[str, float]]:
        """The `count` best (id, cosine) among the rows of `mask`, by exact cosine similarity."""
        with self._lock:
            mask = mask[: len(self._ids)].copy()
            for image_id in exclude:
                if image_id in self._rows:
                    mask[self._rows[image_id]] = False
            rows = np.flatnonzero(mask)
            if rows.size == 0:
                return []
            scores = self._vectors[rows] @ query
            ids = [self._ids[row] for row in rows]
        count = min(count, len(ids))
        best = np.argpartition(-scores, count - 1)[:count]
        best = best[np.lexsort((best, -scores[best]))]
        return [(ids[i], float(scores[i])) for i in best]

    def scores(self, ids: list[str], query: np.ndarray) -> np.ndarray:
        """Cosine of each image with `query`; 0 for an id removed meanwhile (a search racing a delete)."""
        return self.vectors(ids, missing_ok=True) @ query if ids else np.zeros(0, dtype=np.float32)
