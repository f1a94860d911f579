"""Keyword search over file name, folder, description, tags, place and camera: SQLite FTS5, BM25 ranking.

Matching is case-insensitive and accent-insensitive, with English stemming ("dogs" finds "dog").
Inside file names, query words of three letters or more also match as word prefixes ("sun" finds
"sunset.jpg"); file names are split at underscores, dashes, dots, digit/letter and camelCase
boundaries, so parts of a name are words of their own. A few English function words ("a", "the",
"of" ...) are ignored in queries. A word written `field:word` (fields: name, folder, description,
tags, place, camera) only matches in that field: `tags:dog` finds images tagged dog. `place` holds the
photo's place, region and country ("lisbon" finds photos taken there), `camera` its camera and lens.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import unicodedata
from dataclasses import dataclass
from typing import Any

STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "for",
        "from",
        "has",
        "in",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "that",
        "the",
        "this",
        "to",
        "was",
        "were",
        "with",
    ]
)
PREFIX_MIN_LENGTH = 3
BUILD_CHUNK = 2000
# BM25 weights of the columns id, name, folder, description, tags, place, camera (id is not searched).
COLUMN_WEIGHTS = (0.0, 2.0, 1.0, 1.0, 3.0, 2.0, 1.0)
FIELDS = ("name", "folder", "description", "tags", "place", "camera")
_WORD = re.compile(r"\w+", re.UNICODE)
_TERM = re.compile(r"(?:(" + "|".join(FIELDS) + r"):)?(\w+)", re.UNICODE)
_NAME_PARTS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+|[^\W\d_]+", re.UNICODE)


@dataclass(frozen=True)
class KeywordHit:
    id: str
    rank: int
    score: float
    matched_terms: tuple[str, ...]


def fold(text: str) -> str:
    """Lower case without accents."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(char for char in decomposed if not unicodedata.combining(char))


@dataclass(frozen=True)
class Term:
    word: str
    field: str | None = None

    def expression(self) -> str:
        """The FTS5 query of this word: the stemmed word, and a prefix of file-name words."""
        quoted = '"' + self.word.replace('"', '""') + '"'
        if self.field:
            whole = f"{self.field} : {quoted}"
            return f"({whole} OR name : {quoted}*)" if self.field == "name" and self._prefix else whole
        return f"({quoted} OR name : {quoted}*)" if self._prefix else quoted

    @property
    def _prefix(self) -> bool:
        return len(self.word) >= PREFIX_MIN_LENGTH


def query_terms(query: str) -> list[Term]:
    found = _TERM.findall(fold(query))
    return list(dict.fromkeys(Term(word, field or None) for field, word in found if word not in STOP_WORDS))


def name_words(name: str) -> str:
    """A file name and its parts as separate words: 'IMG_0042-beachSunset.jpg' -> '... beach sunset ...'."""
    return " ".join([name, *_NAME_PARTS.findall(name)])


def document_fields(metadata: dict[str, Any]) -> tuple[str, ...]:
    tags = metadata.get("tags") or []
    if isinstance(tags, str):
        tags = [tags]
    return (
        name_words(str(metadata.get("name", ""))),
        str(metadata.get("folder", "")).replace("/", " "),
        str(metadata.get("description", "")),
        " ".join(str(tag) for tag in tags),
        _joined(metadata, ("place", "region", "country")),
        _joined(metadata, ("camera", "lens")),
    )


def _joined(metadata: dict[str, Any], keys: tuple[str, ...]) -> str:
    return " ".join(str(metadata[key]) for key in keys if metadata.get(key))


class KeywordIndex:
    """An in-memory FTS5 table, one row per image; thread-safe.

    `build_in_background` fills it from a snapshot on a thread, so that opening a large collection
    does not wait for it; searches wait until it is complete, and writes made meanwhile win over the
    snapshot.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._ready.set()
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._rowids: dict[str, int] = {}
        self._removed_while_building: set[str] = set()
        self._next_rowid = 0
        self._db.execute(
            "CREATE VIRTUAL TABLE docs USING fts5("
            "id UNINDEXED, name, folder, description, tags, place, camera, "
            "tokenize='porter unicode61 remove_diacritics 2')"
        )

    def put(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        with self._lock, self._db:
            self._delete([image_id for image_id, _ in items])
            self._insert(items)

    def remove(self, ids: list[str]) -> None:
        with self._lock, self._db:
            self._delete(ids)
            if not self._ready.is_set():
                self._removed_while_building.update(ids)

    def build_in_background(self, snapshot: list[tuple[str, dict[str, Any]]]) -> threading.Thread:
        self._ready.clear()
        thread = threading.Thread(target=self._build, args=(snapshot,), name="keyword-index", daemon=True)
        thread.start()
        return thread

    def _build(self, snapshot: list[tuple[str, dict[str, Any]]]) -> None:
        try:
            for start in range(0, len(snapshot), BUILD_CHUNK):
                with self._lock, self._db:
                    skip = self._rowids.keys() | self._removed_while_building
                    self._insert(
                        [item for item in snapshot[start : start + BUILD_CHUNK] if item[0] not in skip]
                    )
        finally:
            with self._lock:
                self._removed_while_building.clear()
            self._ready.set()

    def _insert(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        rows = []
        for image_id, metadata in items:
            self._next_rowid += 1
            self._rowids[image_id] = self._next_rowid
            rows.append((self._next_rowid, image_id, *document_fields(metadata)))
        self._db.executemany(
            "INSERT INTO docs(rowid, id, name, folder, description, tags, place, camera) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    def _delete(self, ids: list[str]) -> None:
        rowids = [(self._rowids.pop(image_id),) for image_id in ids if image_id in self._rowids]
        self._db.executemany("DELETE FROM docs WHERE rowid = ?", rowids)

    def search(self, query: str, limit: int | None = None) -> list[KeywordHit]:
        """Images matching any query word, best BM25 score first, with the words each one matched."""
        terms = query_terms(query)
        if not terms:
            return []
        self._ready.wait()
        weights = ", ".join(str(weight) for weight in COLUMN_WEIGHTS)
        sql = f"SELECT id, -bm25(docs, {weights}) FROM docs WHERE docs MATCH ? ORDER BY bm25(docs, {weights})"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._db.execute(sql, (" OR ".join(term.expression() for term in terms),)).fetchall()
            matching = {term.word: self._ids_matching(term) for term in terms}
        return [
            KeywordHit(
                image_id, rank, float(score), tuple(word for word, ids in matching.items() if image_id in ids)
            )
            for rank, (image_id, score) in enumerate(rows, start=1)
        ]

    def _ids_matching(self, term: Term) -> set[str]:
        return {
            row[0] for row in self._db.execute("SELECT id FROM docs WHERE docs MATCH ?", (term.expression(),))
        }
