"""A float16 copy of the mirror's vectors, memory-mapped, for exact search by a full scan.

Scoring every row of a million 512-d vectors reads 1 GB in float16 against 2 GB in float32, and
torch's float16 matrix-vector product converts on the fly with vector instructions where numpy has no
fast half-precision product. On one 2-core AVX-512 machine a scan of 1M rows took 44 ms in float16
against 124 ms in bfloat16 (torch 2.14 has no fast bfloat16 product there) and 98 ms for numpy's
float32 product (`python bench/scan_dtypes.py`, bench/RESULTS.md). Unit vectors' components lie
in [-1, 1], where float16 rounds each score by about 1e-4 at most, so a scan keeps `RERANK_MARGIN`
more candidates than asked and the caller ranks them again by their float32 vectors: the answer is
the exact top, not an approximation of it.

The copy is derived data: written with every row of the float32 file, and regenerated from it when
the file is missing or of the wrong size (the first start after an upgrade).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

# Candidates kept beyond the number asked, ranked again in float32 by the caller.
RERANK_MARGIN = 256
REGENERATE_CHUNK = 65536


class ScanCopy:
    """`path`, one float16 row per row of `source` (float32, same shape), kept in step by `write`."""

    def __init__(self, path: Path, source: np.ndarray) -> None:
        self.path = path
        rows, self.dim = source.shape
        expected = rows * self.dim * 2
        if not path.is_file() or path.stat().st_size != expected:
            self._regenerate(source)
        self._map(rows)

    def _regenerate(self, source: np.ndarray) -> None:
        log.info("writing the scan copy %s (%d rows)", self.path, len(source))
        with open(self.path, "wb") as file:
            for start in range(0, len(source), REGENERATE_CHUNK):
                file.write(source[start : start + REGENERATE_CHUNK].astype(np.float16).tobytes())

    def _map(self, rows: int) -> None:
        self._rows = np.memmap(self.path, dtype=np.float16, mode="r+", shape=(rows, self.dim))
        self._tensor = torch.from_numpy(self._rows)

    def resize(self, rows: int) -> None:
        """Grow to `rows` rows (the float32 file was grown to as many)."""
        self._rows.flush()
        with open(self.path, "r+b") as file:
            file.truncate(rows * self.dim * 2)
        self._map(rows)

    def write(self, rows: list[int], vectors: np.ndarray) -> None:
        self._rows[rows] = vectors

    def flush(self) -> None:
        self._rows.flush()

    def table(self) -> torch.Tensor:
        """The copy as a (rows, dim) float16 tensor over the mapped file."""
        return self._tensor


def best_rows(table: torch.Tensor, query: np.ndarray, mask: np.ndarray, count: int) -> np.ndarray:
    """The rows among `mask` with the best approximate scores in `table`: `count` + `RERANK_MARGIN`
    of them at most, in no particular order."""
    rows = min(len(table), len(mask))
    keep = min(count + RERANK_MARGIN, int(mask[:rows].sum()))
    if keep <= 0:
        return np.zeros(0, dtype=np.int64)
    query_f16 = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float16))
    scores = torch.mv(table[:rows], query_f16).float()  # a 1-d query: the fast matrix-vector kernel
    scores.masked_fill_(~torch.from_numpy(np.ascontiguousarray(mask[:rows])), -torch.inf)
    return torch.topk(scores, keep, sorted=False).indices.numpy()
