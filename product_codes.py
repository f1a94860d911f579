"""A first pass over 4-bit product-quantisation codes for exact search in large libraries.

An exact search over a million images scans 1 GB of float16 (scan_copy.py): 45-110 ms on 2 cores,
bound by memory bandwidth. Each vector is also kept here as 4-bit product-quantisation codes, one code
per two dimensions (128 bytes for 512-d), searched by faiss's fast-scan kernel (`IndexPQFastScan`, a
table lookup in vector registers): about 11 ms for 1M rows on 2 cores. Its `RERANK` best rows by that
approximate score, plus the count asked, are handed back and the caller ranks them again by their
float32 vectors, so every score is exact and only the choice of candidates is approximate: recall@10
1.000 against exact cosine at 1M with 5,000 candidates (`python bench/first_pass.py`, bench/RESULTS.md).

Rows are the mirror's rows. A row written again is re-encoded in place; rows past the last coded one
are appended. The codes are derived data: trained and encoded in the background once a library
reaches `FIRST_PASS_MIN` images (and again when it has doubled since), saved beside the mirror with
the stamp they reflect, and rebuilt when that stamp is not the mirror's.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path

import numpy as np

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it tells at INFO which CPU build it loads
import faiss  # noqa: E402

log = logging.getLogger(__name__)

# Candidates ranked again in float32 beyond the number asked.
RERANK = 5000
# A selection so narrow that more rows than this must be read from the codes is left to the scan.
MAX_CANDIDATES = 100_000
TRAINING_ROWS = 65536
ENCODE_CHUNK = 65536
BITS = 4


def subquantisers(dim: int) -> int:
    """One 4-bit code per two dimensions (per dimension where `dim` is odd)."""
    return dim // 2 if dim % 2 == 0 else dim


def trained_codes(vectors: np.ndarray, sample: np.ndarray) -> faiss.IndexPQFastScan:
    """Codes for every row of `vectors`, with codebooks trained on the rows `sample`."""
    dim = vectors.shape[1]
    index = faiss.IndexPQFastScan(dim, subquantisers(dim), BITS, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(vectors[np.sort(sample)], dtype=np.float32))
    for start in range(0, len(vectors), ENCODE_CHUNK):
        index.add(np.ascontiguousarray(vectors[start : start + ENCODE_CHUNK], dtype=np.float32))
    return index


def training_sample(alive: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(alive)
    if len(rows) <= TRAINING_ROWS:
        return rows
    return np.random.default_rng(0).choice(rows, TRAINING_ROWS, replace=False)


class ProductCodes:
    """The codes of one mirror's rows (None until trained), thread-safe: searches and writes take one
    lock, so an append never moves the codes under a running search."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._index: faiss.IndexPQFastScan | None = None
        self._lock = threading.Lock()
        self.changed = False

    @property
    def ready(self) -> bool:
        return self._index is not None

    def load(self) -> bool:
        """Read the saved codes; False where there are none or they cannot be read."""
        try:
            index = faiss.read_index(str(self.path))
        except RuntimeError as error:
            log.info("no usable product codes at %s (%s)", self.path, error)
            return False
        with self._lock:
            self._index = index
            self.changed = False
        return True

    def save(self) -> None:
        with self._lock:
            if self._index is None:
                return
            part = self.path.with_suffix(".part")
            faiss.write_index(self._index, str(part))
            os.replace(part, self.path)
            self.changed = False

    def forget(self) -> None:
        with self._lock:
            self._index = None
        self.path.unlink(missing_ok=True)

    def adopt(self, index: faiss.IndexPQFastScan) -> None:
        with self._lock:
            self._index = index
            self.changed = True

    def write(self, rows: list[int], source: np.ndarray) -> None:
        """Encode again the rows of `source` (the float32 vectors) listed, appending rows past the end."""
        with self._lock:
            index = self._index
            if index is None or not rows:
                return
            end = max(rows) + 1
            covered = index.ntotal
            inside = sorted(row for row in set(rows) if row < covered)
            if inside:
                self._recode(index, inside, source)
            if end > covered:
                index.add(np.ascontiguousarray(source[covered:end], dtype=np.float32))
            self.changed = True

    @staticmethod
    def _recode(index: faiss.IndexPQFastScan, rows: list[int], source: np.ndarray) -> None:
        codes = index.pq.compute_codes(np.ascontiguousarray(source[rows], dtype=np.float32))
        packer = index.get_CodePacker()
        blocks = faiss.rev_swig_ptr(index.codes.get(), index.codes.size()).reshape(-1, packer.block_size)
        for row, code in zip(rows, codes, strict=True):
            packer.pack_1_c(
                faiss.swig_ptr(code), row % packer.nvec, faiss.swig_ptr(blocks[row // packer.nvec])
            )

    def best_rows(self, query: np.ndarray, selected: np.ndarray, count: int) -> np.ndarray | None:
        """Rows of `selected` with the best approximate scores: about `count` + `RERANK` of them, in
        no particular order; None where the codes are not ready or the selection is too narrow."""
        with self._lock:
            index = self._index
            if index is None:
                return None
            covered = min(index.ntotal, len(selected))
            chosen = int(selected[:covered].sum())
            fetch = math.ceil((count + RERANK) * covered / max(chosen, 1))
            if fetch > MAX_CANDIDATES:
                return None
            found = np.zeros(0, dtype=np.int64)
            if covered:
                query_row = np.ascontiguousarray(query, dtype=np.float32)[None]
                found = index.search(query_row, min(fetch, index.ntotal))[1][0]
        found = found[(found >= 0) & (found < covered)]
        tail = np.flatnonzero(selected[covered:]) + covered
        return np.concatenate([found[selected[found]], tail])
