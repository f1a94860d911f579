"""The mirror of a collection, kept on disk: vectors memory-mapped, metadata and keywords in SQLite.

Chroma stays the store of record; this mirror answers the searches: exact cosine over the library or
a filtered part of it (up to `EXACT_SEARCH_MAX` images; Chroma's HNSW graph answers beyond that),
filters, vectors by id (more like this, duplicate collapse) and keyword search.

One mirror is one folder: `vectors.f32` (one float32 row per image, rows reused after deletes), its
float16 copy `vectors.f16` for scans (scan_copy.py), and `mirror.sqlite` (each row's id and
metadata as JSON, the FTS5 keyword table, the field counts and the stamp of the collection state it
reflects). Opening it reads only the ids, so start-up time and
memory do not grow with the metadata; a background thread then maps the vectors' pages (page cache
the kernel can reclaim), so that the first searches do not fault them in row by row. The
stamp is cleared before each write to the store and set again after, so a mirror a crash left
half-written never matches the collection and is rebuilt (store.py).
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import math
import mmap
import os
import shutil
import sqlite3
import tempfile
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from columns import ABSENT, ColumnView, FieldColumn, read_column
from filters import Filter
from keywords import KeywordIndex

log = logging.getLogger(__name__)

VECTORS_FILE = "vectors.f32"
SCAN_FILE = "vectors.f16"
CODES_FILE = "codes.npz"
# The scan copy of earlier versions, removed when a mirror is opened.
OLD_SCAN_FILE = "vectors.bf16"
DATABASE_FILE = "mirror.sqlite"
CURRENT_FILE = "current"
LOCK_FILE = ".lock"
SCHEMA_VERSION = "1"
# Filter masks kept per mirror, bounded by their total size (one byte per row).
MASK_CACHE_BYTES = 16 * 1024 * 1024
# Metadata columns kept per mirror for new filters (columns.py); one field whose 1M values all differ
# (a time stamp) takes about 80 MB.
COLUMN_CACHE_BYTES = 256 * 1024 * 1024
# The fields whose columns searches read last (at most RECENT_FIELDS), kept beside the mirror: an API
# server reads them again in the background at start (Catalog.read_recent_fields).
RECENT_FIELDS_FILE = "recent_fields.json"
RECENT_FIELDS = 8
MIN_ROWS = 1024
READ_CHUNK = 20000
# Bytes of float32 rows gathered at once to score them: under the 1 MB above which glibc maps each
# allocation afresh (image_io.py), where a 3,000-row gather took a page fault per 4 KB, 4 ms a query.
GATHER_BYTES = 512 * 1024
# An exact search over at most this share of the rows reads their float32 rows; a broader one scans
# the float16 copy (reading scattered rows costs about 10x a scan per row).
GATHER_MAX_SHARE = 0.1
# Candidates of the product codes read in float32 at first (beyond the number asked), and how many
# times the largest error of their approximate scores an unread row must be off by to be ranked too.
FIRST_STAGE = 512
ERROR_MARGIN = 2.0
# Values read at once (one per page) while the vectors' pages are mapped in the background, and the
# share of the machine's memory the vectors may take for that (larger ones are left to the searches).
MAPPING_CHUNK = 1 << 21
MAPPING_MEMORY_SHARE = 0.5
SCHEMA = """
CREATE TABLE IF NOT EXISTS images (row INTEGER PRIMARY KEY, id TEXT NOT NULL, meta TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS images_by_id ON images (id);
CREATE TABLE IF NOT EXISTS fields (name TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class MirrorDamaged(Exception):
    """The mirror's files cannot be read as a mirror (it is then rebuilt from the store)."""


class Catalog:
    """Vectors and metadata by id in one folder; thread-safe (one lock, one SQLite connection)."""

    def __init__(self, folder: Path, dim: int, first_pass_min: int = 0) -> None:
        self.folder = folder
        self.dim = dim
        self.first_pass_min = first_pass_min
        self._lock = threading.RLock()
        # Fields being read into columns outside the lock; a search that needs one waits for it.
        self._reading: set[str] = set()
        self._read_done = threading.Condition(self._lock)
        self._ids: list[str | None] = []
        self._alive = np.zeros(0, dtype=bool)
        self._rows: dict[str, int] = {}
        self._free: list[int] = []
        self._masks: OrderedDict[str, tuple[Filter, np.ndarray]] = OrderedDict()
        self._columns: OrderedDict[str, FieldColumn] = OrderedDict()
        self._watchers: list[set[int]] = []
        self._codes_builder: threading.Thread | None = None
        self._closed = False
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(folder / DATABASE_FILE, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._db:
                self._db.executescript(SCHEMA)
                self.keywords = KeywordIndex(self._db, self._lock)
            self._check_schema()
            self._field_counts = Counter(dict(self._db.execute("SELECT name, count FROM fields")))
            self._vectors = self._map_vectors()
            from scan_copy import ScanCopy  # torch: imported with a mirror, not by `api.py --help`

            (folder / OLD_SCAN_FILE).unlink(missing_ok=True)
            self._scan = ScanCopy(folder / SCAN_FILE, self._vectors)
            self._read_ids()
            self._open_codes()
            self._start_mapping_pages()
        except (sqlite3.Error, OSError, ValueError) as error:
            raise MirrorDamaged(f"{folder}: {error}") from error

    def _check_schema(self) -> None:
        found = dict(self._db.execute("SELECT key, value FROM state"))
        if not found:
            with self._db:
                self._set_state(schema=SCHEMA_VERSION, dim=str(self.dim), stamp="")
        elif found.get("schema") != SCHEMA_VERSION or found.get("dim") != str(self.dim):
            raise ValueError(f"schema {found.get('schema')} / dim {found.get('dim')} is not this engine's")

    def _set_state(self, **values: str) -> None:
        self._db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)", values.items())

    def _map_vectors(self, rows: int = 0) -> np.memmap:
        path = self.folder / VECTORS_FILE
        path.touch()
        row_bytes = self.dim * 4
        size = path.stat().st_size
        if size % row_bytes:
            raise ValueError(f"{path} holds {size} bytes, not whole rows of {self.dim} float32")
        rows = max(rows, size // row_bytes, MIN_ROWS)
        if rows * row_bytes != size:
            with open(path, "r+b") as file:
                file.truncate(rows * row_bytes)
        return np.memmap(path, dtype=np.float32, mode="r+", shape=(rows, self.dim))

    def _start_mapping_pages(self) -> None:
        rows = rows_in_use(self._alive)
        if rows * self.dim * 4 > MAPPING_MEMORY_SHARE * _physical_memory():
            log.info(
                "%d vectors take more than %.0f%% of memory: not mapped ahead",
                rows,
                100 * MAPPING_MEMORY_SHARE,
            )
            return
        args = (self._vectors, rows)
        threading.Thread(target=self._map_pages, args=args, name="mirror-pages", daemon=True).start()

    def _map_pages(self, vectors: np.memmap, rows: int) -> None:
        """Read one value of each page of the first `rows` float32 vectors, so that their pages are in
        this process's page tables before searches read scattered rows: at 1M images, ranking 3,000
        candidates otherwise faults on about 500 pages, 3 ms of the query, until every page has been
        read once. Stops once the catalog is closed or the vectors are mapped again (they grew)."""
        values = vectors[:rows].reshape(-1)
        step = max(1, mmap.PAGESIZE // values.itemsize)
        for start in range(0, values.size, MAPPING_CHUNK):
            if self._closed or vectors is not self._vectors:
                return
            values[start : start + MAPPING_CHUNK : step].sum()

    def _read_ids(self) -> None:
        """Each row's id, read from the index on ids (`images_by_id`, which holds the rows too): at 1M
        images 33 MB against the table's 450 MB of metadata, 0.6 against 1.3 s from a cold disk."""
        capacity = len(self._vectors)
        found = self._db.execute("SELECT row, id FROM images").fetchall()
        rows = np.fromiter((row for row, _ in found), dtype=np.int64, count=len(found))
        if rows.size and int(rows.max()) >= capacity:
            raise ValueError(f"row {int(rows.max())} is past the vectors file ({capacity} rows)")
        ids = np.full(capacity, None, dtype=object)
        ids[rows] = [image_id for _, image_id in found]
        self._ids = ids.tolist()
        self._rows = {image_id: row for row, image_id in found}
        self._alive = np.zeros(capacity, dtype=bool)
        self._alive[rows] = True
        self._free = np.flatnonzero(~self._alive)[::-1].tolist()

    def _open_codes(self) -> None:
        from product_codes import ProductCodes  # faiss: imported with a mirror, like scan_copy

        self._codes = ProductCodes(self.folder / CODES_FILE)
        state = dict(self._db.execute("SELECT key, value FROM state"))
        self._codes_trained = int(state.get("codes_trained", "0"))
        if self._codes_wanted() and state["stamp"] and state.get("codes_stamp") == state["stamp"]:
            self._codes.load()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._vectors.flush()
            self._scan.flush()
            self._save_codes()
            self._db.close()

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._rows

    # -- the stamp -------------------------------------------------------------------------------

    def stamp(self) -> str:
        """The collection state this mirror reflects ('' while a write is under way or after a crash)."""
        with self._lock:
            found = self._db.execute("SELECT value FROM state WHERE key = 'stamp'").fetchone()
            return found[0] if found else ""

    def set_stamp(self, stamp: str) -> None:
        """Record that the mirror reflects the collection state `stamp` (vectors flushed first)."""
        with self._lock:
            if stamp:
                self._vectors.flush()
                self._scan.flush()
            with self._db:
                self._set_state(stamp=stamp)
            if stamp:
                self._start_codes_if_due()

    # -- the product codes (product_codes.py) -----------------------------------------------------

    def _codes_wanted(self) -> bool:
        """Whether the library is large enough for product codes (FIRST_PASS_MIN, 0: never)."""
        return 0 < self.first_pass_min <= len(self._rows)

    def _start_codes_if_due(self) -> None:
        """Train and encode the codes in the background once the library is large enough for them,
        and again when it has doubled since they were trained (caller holds the lock)."""
        if not self._codes_wanted() or self._codes_builder is not None:
            return
        if self._codes.ready and len(self._rows) < 2 * self._codes_trained:
            return
        self._codes_builder = threading.Thread(target=self._build_codes, name="product-codes", daemon=True)
        self._codes_builder.start()

    def _build_codes(self) -> None:
        """Encode a snapshot of the vectors outside the lock, then encode again the rows written since."""
        from product_codes import trained_codes, training_sample

        with self._lock:
            written: set[int] = set()
            self._watchers.append(written)
            end = rows_in_use(self._alive)  # free rows past the last image need no codes
            vectors, sample, live = self._vectors[:end], training_sample(self._alive), len(self._rows)
        try:
            log.info("training product codes on %d of %d rows", len(sample), len(vectors))
            index = trained_codes(vectors, sample)
        except Exception:
            log.exception("cannot build the product codes; exact searches keep scanning")
            index = None
        with self._lock:
            self._watchers.remove(written)
            self._codes_builder = None
            if index is None or self._closed:
                return
            self._codes.adopt(index)
            self._codes.write(sorted(written), self._vectors)
            self._codes_trained = live
            self._save_codes()
        log.info("product codes ready for %d rows", len(vectors))

    def _save_codes(self) -> None:
        """Save changed codes with the stamp they reflect (none while a write is under way)."""
        stamp = self.stamp()
        if not stamp or not self._codes.changed or self._codes_builder is not None:
            return
        self._codes.save()
        with self._db:
            self._set_state(codes_stamp=stamp, codes_trained=str(self._codes_trained))

    @property
    def first_pass(self) -> str:
        """How a broad exact search chooses its candidates now: "codes", "codes building" or "scan"."""
        with self._lock:
            if not self._codes_wanted():
                return "scan"
            if self._codes.ready:
                return "codes"
            return "codes building" if self._codes_builder is not None else "scan"

    def wait_for_codes(self) -> bool:
        """Wait for a build of the codes under way; whether codes are ready."""
        builder = self._codes_builder
        if builder is not None:
            builder.join()
        return self._codes.ready

    # -- writing ---------------------------------------------------------------------------------

    def put(self, ids: list[str], vectors: np.ndarray, metadatas: list[dict[str, Any]]) -> None:
        with self._lock:
            self._reserve(sum(1 for image_id in set(ids) if image_id not in self._rows))
            rows = []
            for image_id in ids:
                row = self._rows.get(image_id)
                if row is None:
                    row = self._free.pop()
                    self._rows[image_id] = row
                    self._ids[row] = image_id
                    self._alive[row] = True
                rows.append(row)
            self._vectors[rows] = vectors
            self._scan.write(rows, vectors)
            self._codes.write(rows, self._vectors)
            with self._db:
                self._store_metadata(list(zip(rows, ids, metadatas, strict=True)))

    def update_metadata(self, ids: list[str], metadatas: list[dict[str, Any]]) -> None:
        """Replace the metadata of the images this mirror has (others are skipped)."""
        with self._lock:
            known = [
                (self._rows[image_id], image_id, metadata)
                for image_id, metadata in zip(ids, metadatas, strict=True)
                if image_id in self._rows
            ]
            with self._db:
                self._store_metadata(known)

    def remove(self, ids: Iterable[str]) -> None:
        with self._lock:
            rows = [self._rows.pop(image_id) for image_id in dict.fromkeys(ids) if image_id in self._rows]
            with self._db:
                self._forget_fields(rows)
                self._db.executemany("DELETE FROM images WHERE row = ?", [(row,) for row in rows])
                self.keywords.remove(rows)
                self._save_field_counts()
            for row in rows:
                self._ids[row] = None
                self._alive[row] = False
                self._free.append(row)
            self._touch({row: None for row in rows})

    def _store_metadata(self, rows: list[tuple[int, str, dict[str, Any]]]) -> None:
        self._forget_fields([row for row, _, _ in rows])
        self._db.executemany(
            "INSERT OR REPLACE INTO images VALUES (?, ?, ?)",
            [(row, image_id, json.dumps(metadata)) for row, image_id, metadata in rows],
        )
        self.keywords.put(rows)
        for _, _, metadata in rows:
            self._field_counts.update(metadata.keys())
        self._save_field_counts()
        self._touch({row: metadata for row, _, metadata in rows})

    def _touch(self, changed: dict[int, dict[str, Any] | None]) -> None:
        """Bring the cached filter masks up to date with rows written (metadata) or removed (None)."""
        for watcher in self._watchers:
            watcher.update(changed)
        for key, (image_filter, mask) in self._masks.items():
            if changed and max(changed) >= len(mask):
                mask = np.concatenate([mask, np.zeros(len(self._ids) - len(mask), dtype=bool)])
                self._masks[key] = (image_filter, mask)
            for row, metadata in changed.items():
                mask[row] = metadata is not None and image_filter.matches(metadata)
        for name, column in self._columns.items():
            column.write(field_values(changed, name))

    def _forget_fields(self, rows: list[int]) -> None:
        for _, metadata in self._metadata_of(rows):
            self._field_counts.subtract(metadata.keys())

    def _save_field_counts(self) -> None:
        self._db.execute("DELETE FROM fields")
        self._db.executemany(
            "INSERT INTO fields VALUES (?, ?)", [(name, n) for name, n in self._field_counts.items() if n > 0]
        )

    def _reserve(self, extra: int) -> None:
        missing = extra - len(self._free)
        if missing <= 0:
            return
        old = len(self._ids)
        size = max(old + missing, int(old * 1.5), MIN_ROWS)
        self._vectors.flush()
        self._vectors = self._map_vectors(size)
        self._start_mapping_pages()
        self._scan.resize(size)
        self._ids.extend([None] * (size - old))
        self._alive = np.concatenate([self._alive, np.zeros(size - old, dtype=bool)])
        self._free.extend(range(size - 1, old - 1, -1))

    # -- reading ---------------------------------------------------------------------------------

    def _metadata_of(self, rows: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        for start in range(0, len(rows), 500):
            chunk = rows[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT row, meta FROM images WHERE row IN ({marks})"
            for row, meta in self._db.execute(query, chunk).fetchall():
                yield row, json.loads(meta)

    def field_names(self) -> frozenset[str]:
        """The metadata fields that at least one image has."""
        with self._lock:
            return frozenset(name for name, count in self._field_counts.items() if count > 0)

    def metadata(self, image_id: str) -> dict[str, Any] | None:
        return self.metadatas([image_id])[0]

    def vector(self, image_id: str) -> np.ndarray | None:
        with self._lock:
            row = self._rows.get(image_id)
            return None if row is None else np.array(self._vectors[row])

    def vectors(self, ids: list[str], missing_ok: bool = False) -> np.ndarray:
        """The vectors of the images; with `missing_ok`, a zero vector for an id removed meanwhile."""
        with self._lock:
            if not missing_ok:
                return np.asarray(self._vectors)[[self._rows[image_id] for image_id in ids]]
            rows = [self._rows.get(image_id, -1) for image_id in ids]
            vectors = np.asarray(self._vectors)[rows] if rows else np.zeros((0, self.dim), dtype=np.float32)
            vectors[[i for i, row in enumerate(rows) if row < 0]] = 0.0
            return vectors

    def metadatas(self, ids: list[str]) -> list[dict[str, Any] | None]:
        """The metadata of each image (None where removed meanwhile), read at once."""
        with self._lock:
            rows = [self._rows.get(image_id) for image_id in ids]
            found = dict(self._metadata_of([row for row in rows if row is not None]))
        return [None if row is None else found.get(row) for row in rows]

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        return [(image_id, metadata) for _, image_id, metadata in self._all_records()]

    def _all_records(self) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """Every (row, id, metadata), read on a connection of its own (writes are not held up)."""
        reader = sqlite3.connect(self.folder / DATABASE_FILE)
        try:
            last = -1
            while True:
                chunk = reader.execute(
                    "SELECT row, id, meta FROM images WHERE row > ? ORDER BY row LIMIT ?", (last, READ_CHUNK)
                ).fetchall()
                if not chunk:
                    return
                for row, image_id, meta in chunk:
                    yield row, image_id, json.loads(meta)
                last = chunk[-1][0]
        finally:
            reader.close()

    def mask(self, image_filter: Filter | None) -> np.ndarray:
        """Which rows are live images matching the filter.

        A filter's first use reads the fields it tests that no recent filter read (columns.py), on a
        connection of its own so that writes and other searches go on; its mask is then cached and
        kept up to date by the writes, as are the columns. A field another search is reading is waited
        for, not read twice.
        """
        with self._lock:
            if image_filter is None:
                return self._alive.copy()
            self._read_done.wait_for(lambda: not image_filter.fields & self._reading)
            cached = self._masks.get(image_filter.key)
            if cached:
                self._masks.move_to_end(image_filter.key)
                return cached[1]
            reading = self._start_reading(image_filter.fields)
            mask = self._alive.copy()
        with self._finished_on_error(reading):
            read = {name: self._read_column(name, reading.size, held) for name, held in reading.held.items()}
            views = {**reading.views, **{name: column.view(reading.size) for name, column in read.items()}}
            for condition in image_filter.conditions:
                mask &= views[condition.field].matching(condition)
        with self._lock:
            return self._cache_mask(image_filter, mask, self._finish_reading(reading, read))

    def rows_of(self, ids: list[str]) -> np.ndarray:
        """The row of each image; ABSENT where it was removed meanwhile."""
        with self._lock:
            return np.array([self._rows.get(image_id, ABSENT) for image_id in ids], dtype=np.int64)

    def numbers(self, rows: np.ndarray, name: str) -> np.ndarray:
        """The field `name` of the image in each row as the float equal to it; NaN where it holds no
        number or the row is ABSENT or free. A field no recent filter read is read first, as in `mask`."""
        while True:
            self.read_field(name)
            with self._lock:
                if name in self._columns:  # else dropped from the cache meanwhile: read again
                    self._columns.move_to_end(name)
                    return self._columns[name].view(len(self._ids)).numbers_at(rows)

    def read_field(self, name: str) -> None:
        """Make sure the field `name` is cached as a column: read it, or wait for the search reading it."""
        with self._lock:
            self._read_done.wait_for(lambda: name not in self._reading)
            if name in self._columns:
                return
            reading = self._start_reading(frozenset({name}))
        with self._finished_on_error(reading):
            column = self._read_column(name, reading.size, reading.held[name])
        with self._lock:
            self._finish_reading(reading, {name: column})

    def read_recent_fields(self) -> list[str]:
        """Read into columns the fields that searches of this mirror read last, so that the first filter
        or date sort on them after a start reads nothing; the fields read. They are read in the order
        they were first read, so that the record, written again as each is read, keeps that order."""
        recent = self._recent_fields()
        for name in recent:
            self.read_field(name)
        return recent

    def _recent_fields(self) -> list[str]:
        try:
            names = json.loads((self.folder / RECENT_FIELDS_FILE).read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(names, list):
            return []
        return [name for name in names if isinstance(name, str)][-RECENT_FIELDS:]

    def _remember_fields(self, names: Iterable[str]) -> None:
        """Record these fields, just read, as the most recent ones."""
        read = sorted(names)
        recent = [name for name in self._recent_fields() if name not in read] + read
        path = self.folder / RECENT_FIELDS_FILE
        part = path.with_name(path.name + ".part")
        try:
            part.write_text(json.dumps(recent[-RECENT_FIELDS:]))
            os.replace(part, path)
        except OSError as error:
            log.warning("cannot record the fields read in %s: %s", path, error)

    def _start_reading(self, names: frozenset[str]) -> _Reading:
        """Under the lock: views of the fields cached, and the others marked as being read, with a
        watcher that collects the rows written from now on."""
        size = len(self._ids)
        views = {}
        for name in names & self._columns.keys():
            self._columns.move_to_end(name)
            views[name] = self._columns[name].view(size)
        held = {name: self._field_counts[name] > 0 for name in names - views.keys()}
        self._reading |= held.keys()
        watcher: set[int] = set()
        self._watchers.append(watcher)
        return _Reading(watcher, size, views, held)

    def _finish_reading(
        self, reading: _Reading, read: dict[str, FieldColumn]
    ) -> dict[int, dict[str, Any] | None]:
        """Under the lock: cache the columns read, brought up to date with the rows written meanwhile
        (returned, as `_written` gives them)."""
        self._watchers.remove(reading.watcher)
        written = self._written(reading.watcher)
        self._cache_columns(read, written)
        self._stop_reading(reading)
        if read:
            self._remember_fields(read)
        return written

    def _stop_reading(self, reading: _Reading) -> None:
        self._reading -= reading.held.keys()
        self._read_done.notify_all()

    @contextmanager
    def _finished_on_error(self, reading: _Reading) -> Iterator[None]:
        try:
            yield
        except BaseException:
            with self._lock:
                self._watchers.remove(reading.watcher)
                self._stop_reading(reading)
            raise

    def _read_column(self, name: str, size: int, held: bool) -> FieldColumn:
        """The field `name` of rows below `size`; none are read where no image `held` the field when the
        read began (the rows written since reach the column through the watcher)."""
        if not held:
            return FieldColumn.without_values(size)
        reader = sqlite3.connect(self.folder / DATABASE_FILE)
        try:
            return read_column(reader, name, size, self._rows_and_metadata)
        finally:
            reader.close()

    def _rows_and_metadata(self) -> Iterator[tuple[int, dict[str, Any]]]:
        return ((row, metadata) for row, _, metadata in self._all_records())

    def _written(self, rows: set[int]) -> dict[int, dict[str, Any] | None]:
        """The metadata of the rows a watcher saw written (None: removed), as `_touch` gets them."""
        metadatas = dict(self._metadata_of(sorted(rows)))
        return {row: metadatas.get(row) for row in rows}

    def _cache_columns(self, read: dict[str, FieldColumn], written: dict[int, dict[str, Any] | None]) -> None:
        """Cache columns read outside the lock, after writing to them the rows written meanwhile."""
        for name, column in read.items():
            column.write(field_values(written, name))
            self._columns[name] = column
            self._columns.move_to_end(name)
        while (
            len(self._columns) > 1
            and sum(column.nbytes for column in self._columns.values()) > COLUMN_CACHE_BYTES
        ):
            self._columns.popitem(last=False)

    def _cache_mask(
        self, image_filter: Filter, mask: np.ndarray, written: dict[int, dict[str, Any] | None]
    ) -> np.ndarray:
        """Cache a mask computed outside the lock, after redoing the rows written meanwhile."""
        if len(mask) < len(self._ids):
            mask = np.concatenate([mask, np.zeros(len(self._ids) - len(mask), dtype=bool)])
        for row, metadata in written.items():
            mask[row] = metadata is not None and image_filter.matches(metadata)
        self._masks[image_filter.key] = (image_filter, mask)
        while len(self._masks) > max(1, MASK_CACHE_BYTES // max(len(mask), 1)):
            self._masks.popitem(last=False)
        return mask

    def selected(self, ids: list[str], mask: np.ndarray) -> list[bool]:
        """Whether each id is an image whose row `mask` selects."""
        with self._lock:
            rows = [self._rows.get(image_id) for image_id in ids]
            return [row is not None and row < len(mask) and bool(mask[row]) for row in rows]

    def exact_top(
        self,
        query: np.ndarray,
        mask: np.ndarray | None,
        count: int,
        exclude: frozenset[str] = frozenset(),
    ) -> list[tuple[str, float]]:
        """The `count` best (id, cosine) among the rows of `mask` (None: every image), by exact cosine.

        A broad selection is first narrowed, outside the lock so that writes and other searches go
        on, by the product codes in a large library (product_codes.py), else by a scan of the float16
        copy; the candidates are then ranked by their float32 vectors.
        """
        wanted = count + len(exclude)
        with self._lock:
            selected = self._alive if mask is None else mask[: len(self._ids)] & self._alive[: len(mask)]
            chosen = len(self._rows) if mask is None else int(np.count_nonzero(selected))
            if chosen <= len(selected) * GATHER_MAX_SHARE:
                rows = np.flatnonzero(selected)
                return self._ranked(rows[self._still_selected(rows, mask, exclude)], query, count)
            table = self._scan.table()
            coded = self._codes_wanted()
            if coded:
                self._start_codes_if_due()
        found = self._codes.best_rows(query, selected, wanted) if coded else None
        if found is None:
            from scan_copy import best_rows

            rows = np.sort(best_rows(table, query, selected[: rows_in_use(selected)], wanted))
            with self._lock:
                return self._ranked(rows[self._still_selected(rows, mask, exclude)], query, count)
        with self._lock:
            still = self._still_selected(found.rows, mask, exclude)
            return self._ranked_in_stages(found.rows[still], found.approximate[still], query, count)

    def ranked_rows(
        self, query: np.ndarray, mask: np.ndarray | None, exclude: frozenset[str] = frozenset()
    ) -> tuple[list[str | None], np.ndarray, np.ndarray]:
        """Every live image of `mask` (None: all) not in `exclude`, best first by exact cosine, ties in
        row order, as arrays rather than one Python object each: the rows and their cosines, with the
        id in each row as it was then (None: a free row)."""
        with self._lock:
            selected = self._alive if mask is None else mask[: len(self._ids)] & self._alive[: len(mask)]
            rows = np.flatnonzero(selected)
            rows = rows[self._still_selected(rows, mask, exclude)]
            scores = self._exact_scores(rows, query)
            ids_by_row = self._ids.copy()
        order = np.lexsort((rows, -scores))
        return ids_by_row, rows[order], scores[order]

    def twins(self, rows: np.ndarray, of: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Which of `rows` hold an image whose cosine with one of the vectors `of` is at least
        `threshold`: their indices in `rows`, in order, and for each the index of the first such vector.
        ABSENT and free rows hold none. One pass over the rows' float32 vectors in row order, in blocks."""
        against = np.ascontiguousarray(of.T, dtype=np.float32)
        in_row_order = np.argsort(rows, kind="stable")
        in_row_order = in_row_order[rows[in_row_order] >= 0]
        found, first = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
        for start in range(0, len(in_row_order), self._gather_rows):
            indices = in_row_order[start : start + self._gather_rows]
            with self._lock:  # block by block: a write waits for one block, not the whole pass
                live = rows[indices] < len(self._alive)
                live[live] = self._alive[rows[indices[live]]]
                indices = indices[live]
                near = self._vectors_of(rows[indices]) @ against >= threshold
            hits = np.flatnonzero(near.any(axis=1))
            found.append(indices[hits])
            first.append(np.argmax(near[hits], axis=1))
        found_at, first_of = np.concatenate(found), np.concatenate(first)
        order = np.argsort(found_at)
        return found_at[order], first_of[order]

    @property
    def _gather_rows(self) -> int:
        """Rows whose float32 vectors take `GATHER_BYTES`."""
        return max(1, GATHER_BYTES // (self.dim * 4))

    def _vectors_of(self, rows: np.ndarray) -> np.ndarray:
        """The float32 vectors of these rows: a view where they follow each other, as in a pass over
        most of the library, else a copy."""
        if rows.size and rows[-1] - rows[0] + 1 == rows.size and bool(np.all(np.diff(rows) == 1)):
            return self._vectors[rows[0] : rows[-1] + 1]
        return self._vectors[rows]

    def _still_selected(
        self, rows: np.ndarray, mask: np.ndarray | None, exclude: frozenset[str]
    ) -> np.ndarray:
        """Which of `rows` are (still, after a search outside the lock) live images of `mask` (None:
        all) and not of `exclude`."""
        inside = rows < len(self._alive) if mask is None else rows < min(len(self._alive), len(mask))
        keep = inside.copy()
        keep[inside] = self._alive[rows[inside]]
        if mask is not None:
            keep[inside] &= mask[rows[inside]]
        excluded = [self._rows[image_id] for image_id in exclude if image_id in self._rows]
        if excluded:
            keep &= ~np.isin(rows, excluded)
        return keep

    def _ranked(self, rows: np.ndarray, query: np.ndarray, count: int) -> list[tuple[str, float]]:
        """The `count` best of `rows` by exact cosine, ties in row order."""
        return self._best(rows, self._exact_scores(rows, query), count)

    def _exact_scores(self, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
        """The cosine of each of `rows` with `query`, from their float32 vectors, gathered in blocks of
        `GATHER_BYTES`; more than one block's rows are split into one share per core, read side by
        side (3,000 scattered rows of a 1M library: 1.2 against 1.8 ms on 2 cores)."""
        scores = np.empty(rows.size, dtype=np.float32)
        block = self._gather_rows

        def score(share: range) -> None:
            for start in range(share.start, share.stop, block):
                end = min(share.stop, start + block)
                scores[start:end] = self._vectors_of(rows[start:end]) @ query

        shares = _shares(rows.size, block)
        if len(shares) == 1:
            score(shares[0])
        else:
            from product_codes import search_pool

            list(search_pool().map(score, shares))
        return scores

    def _ranked_in_stages(
        self, rows: np.ndarray, approximate: np.ndarray, query: np.ndarray, count: int
    ) -> list[tuple[str, float]]:
        """The `count` best of `rows` by exact cosine, where `rows` come best first by `approximate`
        scores.

        The float32 vectors of the first `FIRST_STAGE` + `count` rows are read, then at once those of
        every row that could still enter the top (`_rows_to_read`), and again until none can. An image
        query's neighbours stand out and settle in the first stage; a text query's do not, and read
        every candidate in a second (3,000 candidates at 1M: 1.45-1.88 ms against 1.98-2.41 ms in
        four stages of doubling size, the earlier way, in two A/B runs).
        """
        read = min(rows.size, FIRST_STAGE + count)
        exact = self._exact_scores(rows[:read], query)
        while (end := _rows_to_read(exact, approximate, count)) > read:
            exact = np.concatenate([exact, self._exact_scores(rows[read:end], query)])
            read = end
        return self._best(rows[:read], exact, count)

    def _best(self, rows: np.ndarray, scores: np.ndarray, count: int) -> list[tuple[str, float]]:
        """The `count` best (id, score) of `rows`, ties in row order."""
        if rows.size == 0:
            return []
        count = min(count, rows.size)
        best = np.argpartition(-scores, count - 1)[:count]
        best = best[np.lexsort((rows[best], -scores[best]))]
        return [(self._ids[rows[i]], float(scores[i])) for i in best]

    def scores(self, ids: list[str], query: np.ndarray) -> np.ndarray:
        """Cosine of each image with `query`; 0 for an id removed meanwhile (a search racing a delete)."""
        return self.vectors(ids, missing_ok=True) @ query if ids else np.zeros(0, dtype=np.float32)


def _shares(count: int, block: int) -> list[range]:
    """`count` rows cut into one contiguous share per core, of one `block` at least."""
    from loaders import available_cores

    parts = max(1, min(available_cores(), count // block))
    bounds = [count * part // parts for part in range(parts + 1)]
    return [range(start, end) for start, end in itertools.pairwise(bounds)]


def _rows_to_read(exact: np.ndarray, approximate: np.ndarray, count: int) -> int:
    """How many of the candidates, best first by `approximate` score, must be read to rank the `count`
    best exactly, given the `exact` scores of the first ones: none more once no unread row can still
    enter the top, else at least twice those read (so that the reads stay few), and up to the last row
    whose approximate score reaches the top's last exact score less `ERROR_MARGIN` times the largest
    error seen among those read (rows with no approximate score, inf, do not count). Twice those read
    while fewer than `count` are, or no error is known yet."""
    read = len(exact)
    doubled = min(len(approximate), 2 * read)
    scored = np.isfinite(approximate[:read])
    if read < count or not scored.any():
        return doubled
    error = float(np.max(np.abs(exact[scored] - approximate[:read][scored])))
    floor = float(np.partition(exact, -count)[-count]) - ERROR_MARGIN * error
    last = read + int(np.searchsorted(-approximate[read:], -floor, side="right"))
    return read if last == read else max(last, doubled)


@dataclass
class _Reading:
    """The fields one search reads into columns outside the lock."""

    watcher: set[int]  # the rows written since the read began
    size: int  # the rows read
    views: dict[str, ColumnView]  # the fields already cached
    held: dict[str, bool]  # the fields to read, each with whether any image holds it


def field_values(changed: dict[int, dict[str, Any] | None], name: str) -> dict[int, Any]:
    """The field `name` of each row's metadata (None where absent or the row was removed)."""
    return {row: None if metadata is None else metadata.get(name) for row, metadata in changed.items()}


def _physical_memory() -> float:
    """The machine's memory in bytes (infinite where the system does not tell)."""
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return math.inf


def rows_in_use(selected: np.ndarray) -> int:
    """One past the last selected row (0 when none is): the rows past it are free."""
    if not selected.any():
        return 0
    return len(selected) - int(np.argmax(selected[::-1].copy()))  # argmax is fast on a contiguous copy


def lock_exclusively(folder: Path, name: str) -> TextIO:
    """Open `folder/name` and hold an exclusive flock on it; BlockingIOError if another process does."""
    folder.mkdir(parents=True, exist_ok=True)
    lock_file = open(folder / name, "a+")  # noqa: SIM115 - held open while locked
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock_file.close()
        raise
    return lock_file


def unlock(lock_file: TextIO) -> None:
    fcntl.flock(lock_file, fcntl.LOCK_UN)
    lock_file.close()


class MirrorFolder:
    """The builds of one collection's mirror under one folder, and which of them is current.

    A mirror is rebuilt into a new sub-folder and made current by replacing the `current` file, so a
    build cut short never replaces a good mirror. The folder is locked by one process at a time; a
    second process on the same machine (server mode) keeps its mirror in a temporary folder instead.
    """

    def __init__(self, folder: Path, dim: int, first_pass_min: int = 0) -> None:
        self.dim = dim
        self.first_pass_min = first_pass_min
        self._lock_file = None
        self._temporary: tempfile.TemporaryDirectory[str] | None = None
        self.folder = self._locked(folder)

    def _locked(self, folder: Path) -> Path:
        try:
            lock_file = lock_exclusively(folder, LOCK_FILE)
        except OSError as error:
            self._temporary = tempfile.TemporaryDirectory(prefix="image-search-mirror-")
            log.info("mirror folder %s not usable (%s): this process keeps its own", folder, error)
            return Path(self._temporary.name)
        self._lock_file = lock_file
        return folder

    def open_current(self, stamp: str, count: int | None) -> Catalog | None:
        """The current mirror if it reflects the collection state `stamp` with `count` images (None:
        not counted)."""
        try:
            name = (self.folder / CURRENT_FILE).read_text().strip()
        except OSError:
            return None
        if not name or not (self.folder / name).is_dir():
            return None
        try:
            catalog = Catalog(self.folder / name, self.dim, self.first_pass_min)
        except MirrorDamaged as error:
            log.warning("the mirror cannot be read, rebuilding it: %s", error)
            return None
        if catalog.stamp() == stamp and count in (None, len(catalog)):
            return catalog
        log.info("the mirror at %s is stale, rebuilding it", catalog.folder)
        catalog.close()
        return None

    def new_build(self) -> Catalog:
        return Catalog(self.folder / f"build-{uuid.uuid4().hex[:12]}", self.dim, self.first_pass_min)

    def make_current(self, catalog: Catalog) -> None:
        """Point `current` at `catalog`'s folder and delete every other build."""
        pointer = self.folder / (CURRENT_FILE + ".new")
        pointer.write_text(catalog.folder.name)
        os.replace(pointer, self.folder / CURRENT_FILE)
        for build in self.folder.glob("build-*"):
            if build != catalog.folder:
                shutil.rmtree(build, ignore_errors=True)

    def close(self) -> None:
        if self._lock_file is not None:
            unlock(self._lock_file)
            self._lock_file = None
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None
