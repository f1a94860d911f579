"""A first pass over 4-bit product-quantisation codes for exact search in large libraries.

An exact search over a million images scans 1 GB of float16 (scan_copy.py): 45-110 ms on 2 cores,
bound by memory bandwidth. Each vector is also kept here as 4-bit product-quantisation codes, one code
per two dimensions (128 bytes for 512-d), searched by faiss's fast-scan kernel (`IndexPQFastScan`, a
table lookup in vector registers): about 8-11 ms for 1M rows on 2 cores. Its `RERANK` best rows by
that approximate score, plus the count asked, are handed back best first with those scores, and the
caller ranks them again by their float32 vectors, so every score is exact and only the choice of
candidates is approximate. The caller reads them in stages and stops once no unread candidate can
still enter the top (catalog.py, `Catalog._ranked_in_stages`): an image query's neighbours stand out
and settle among the first few hundred; a text query of the random-weight test model, a random
direction to the library, reads all of them. Recall@10 against exact cosine at 1M for those hard
queries, mean / worst of 200: 0.995 / 0.8 with 1,000 candidates, 0.999 / 0.9 with 2,000, 1.000 / 0.9
with 3,000, 1.000 / 1.0 with 5,000 (`python bench/first_pass.py`, bench/RESULTS.md).

Rows are the mirror's rows, in shards of `SHARD_ROWS` searched side by side on the cores. A row
written again is re-encoded in place; rows past the last coded one are appended. The codes are
derived data: trained and encoded in the background once a library reaches `FIRST_PASS_MIN` images
(and again when it has doubled since), saved beside the mirror (`codes.npz`, one serialised faiss
index per shard) with the stamp they reflect, and rebuilt when that stamp is not the mirror's.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it tells at INFO which CPU build it loads
import faiss  # noqa: E402

log = logging.getLogger(__name__)

# Candidates ranked again in float32 beyond the number asked.
RERANK = 3000
# A selection so narrow that more rows than this must be read from the codes is left to the scan.
MAX_CANDIDATES = 100_000
TRAINING_ROWS = 65536
# Rows of one shard of codes; shards are searched side by side on the cores (1M rows: 12.6 ms in one
# shard, 8.0 ms in two or four on 2 cores).
SHARD_ROWS = 262144
ENCODE_CHUNK = 65536
BITS = 4


def subquantisers(dim: int) -> int:
    """One 4-bit code per two dimensions (per dimension where `dim` is odd)."""
    return dim // 2 if dim % 2 == 0 else dim


def trained_codes(vectors: np.ndarray, sample: np.ndarray) -> list[faiss.IndexPQFastScan]:
    """Codes for every row of `vectors` in shards of `SHARD_ROWS`, with codebooks trained on the rows
    `sample`."""
    dim = vectors.shape[1]
    empty = faiss.IndexPQFastScan(dim, subquantisers(dim), BITS, faiss.METRIC_INNER_PRODUCT)
    empty.train(np.ascontiguousarray(vectors[np.sort(sample)], dtype=np.float32))
    shards = [empty]
    _append(shards, vectors, 0)
    return shards


def _append(shards: list[faiss.IndexPQFastScan], source: np.ndarray, start: int) -> None:
    """Encode the rows of `source` from `start` on onto the end of `shards` (which cover `start` rows),
    opening new shards as they fill."""
    while start < len(source):
        last = shards[-1]
        if last.ntotal == SHARD_ROWS:
            last = faiss.clone_index(last)
            last.reset()
            shards.append(last)
        end = min(len(source), start + SHARD_ROWS - last.ntotal, start + ENCODE_CHUNK)
        last.add(np.ascontiguousarray(source[start:end], dtype=np.float32))
        start = end


def _recode(shard: faiss.IndexPQFastScan, rows: np.ndarray, vectors: np.ndarray) -> None:
    """Replace the codes of the shard's `rows` (its own numbering) by those of `vectors`, in place."""
    codes = shard.pq.compute_codes(np.ascontiguousarray(vectors, dtype=np.float32))
    packer = shard.get_CodePacker()
    blocks = faiss.rev_swig_ptr(shard.codes.get(), shard.codes.size()).reshape(-1, packer.block_size)
    for row, code in zip(rows.tolist(), codes, strict=True):
        block = blocks[row // packer.nvec]
        packer.pack_1_c(faiss.swig_ptr(code), row % packer.nvec, faiss.swig_ptr(block))


def training_sample(alive: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(alive)
    if len(rows) <= TRAINING_ROWS:
        return rows
    return np.random.default_rng(0).choice(rows, TRAINING_ROWS, replace=False)


class ProductCodes:
    """The codes of one mirror's rows (none until trained), thread-safe: searches and writes take one
    lock, so an append never moves the codes under a running search."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._shards: list[faiss.IndexPQFastScan] = []
        self._lock = threading.Lock()
        self.changed = False

    @property
    def ready(self) -> bool:
        return bool(self._shards)

    def load(self) -> bool:
        """Read the saved codes; False where there are none or they cannot be read."""
        try:
            with np.load(self.path) as saved:
                shards = [faiss.deserialize_index(saved[name]) for name in saved.files]
        except (OSError, ValueError, RuntimeError) as error:
            log.info("no usable product codes at %s (%s)", self.path, error)
            return False
        if not shards or any(shard.ntotal != SHARD_ROWS for shard in shards[:-1]):
            return False  # saved with another shard size
        with self._lock:
            self._shards = shards
            self.changed = False
        return True

    def save(self) -> None:
        with self._lock:
            if not self._shards:
                return
            part = self.path.with_name(self.path.name + ".part")
            with open(part, "wb") as file:
                np.savez(file, *[faiss.serialize_index(shard) for shard in self._shards])
            os.replace(part, self.path)
            self.changed = False

    def adopt(self, shards: list[faiss.IndexPQFastScan]) -> None:
        with self._lock:
            self._shards = shards
            self.changed = True

    def _covered(self) -> int:
        return (len(self._shards) - 1) * SHARD_ROWS + self._shards[-1].ntotal

    def write(self, rows: list[int], source: np.ndarray) -> None:
        """Encode again the rows of `source` (the float32 vectors) listed, appending rows past the end."""
        with self._lock:
            if not self._shards or not rows:
                return
            covered = self._covered()
            inside = np.unique(np.array([row for row in rows if row < covered], dtype=np.int64))
            for number in np.unique(inside // SHARD_ROWS).tolist():
                mine = inside[inside // SHARD_ROWS == number]
                _recode(self._shards[number], mine - number * SHARD_ROWS, source[mine])
            _append(self._shards, source[: max(rows) + 1], covered)
            self.changed = True

    def best_rows(self, query: np.ndarray, selected: np.ndarray, count: int) -> Candidates | None:
        """Rows of `selected` with the best approximate scores, best first, with those scores: about
        `count` + `RERANK` of them, and every selected row past the codes first (score inf); None where
        the codes are not ready or the selection is too narrow."""
        with self._lock:
            if not self._shards:
                return None
            covered = min(self._covered(), len(selected))
            fetch = math.ceil((count + RERANK) * covered / max(np.count_nonzero(selected[:covered]), 1))
            if fetch > MAX_CANDIDATES:
                return None
            scores, rows = self._search(np.ascontiguousarray(query, dtype=np.float32)[None], fetch)
        inside = rows < covered
        scores, rows = scores[inside], rows[inside]
        kept = selected[rows]
        tail = np.flatnonzero(selected[covered:]) + covered
        return Candidates(
            np.concatenate([tail, rows[kept]]),
            np.concatenate([np.full(len(tail), np.inf, dtype=np.float32), scores[kept]]),
        )

    def _search(self, query: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """The approximate scores and rows of the `fetch` best rows, best first, the shards searched
        side by side. Each shard's come best first, so a stable sort of them all merges sorted runs
        (four shards' 3,010 each at 1M: 0.10 ms, where a partition then a sort took 0.25 ms)."""

        def search(number: int) -> tuple[np.ndarray, np.ndarray]:
            shard = self._shards[number]
            scores, rows = shard.search(query, min(fetch, shard.ntotal))
            kept = rows[0] >= 0
            return scores[0][kept], rows[0][kept] + number * SHARD_ROWS

        found = list(search_pool().map(search, range(len(self._shards))))
        scores = np.concatenate([shard_scores for shard_scores, _ in found])
        rows = np.concatenate([shard_rows for _, shard_rows in found])
        best = np.argsort(-scores, kind="stable")[:fetch]
        return scores[best], rows[best]


class Candidates(NamedTuple):
    """Rows best first by an approximate score, with those scores (inf: no approximate score)."""

    rows: np.ndarray
    approximate: np.ndarray


@functools.cache
def search_pool() -> ThreadPoolExecutor:
    """One thread per core for a search's parts run side by side: the shards of the codes, and the
    shares of the candidates whose float32 rows are read (faiss and numpy let go of the GIL)."""
    from loaders import available_cores  # torch, loaded by then: the mirror imports scan_copy first

    return ThreadPoolExecutor(max_workers=available_cores(), thread_name_prefix="search")
