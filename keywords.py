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
    """An FTS5 table, one row per image, in the mirror's SQLite database (rowid = the image's row).

    It shares the catalog's connection and lock; `put` and `remove` run inside the catalog's
    transaction, so the table always agrees with the images it indexes.
    """

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock) -> None:
        self._db = db
        self._lock = lock
        self._db.execute(
            "CREATE VIRTUAL TABLE IF NOT EXISTS docs USING fts5("
            "id UNINDEXED, name, folder, description, tags, place, camera, "
            "tokenize='porter unicode61 remove_diacritics 2')"
        )

    def put(self, rows: list[tuple[int, str, dict[str, Any]]]) -> None:
        """Index (row, id, metadata) of each image, replacing what those rows held."""
        self.remove([row for row, _, _ in rows])
        self._db.executemany(
            "INSERT INTO docs(rowid, id, name, folder, description, tags, place, camera) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(row, image_id, *document_fields(metadata)) for row, image_id, metadata in rows],
        )

    def remove(self, rows: list[int]) -> None:
        self._db.executemany("DELETE FROM docs WHERE rowid = ?", [(row,) for row in rows])

    def search(self, query: str, limit: int | None = None) -> list[KeywordHit]:
        """Images matching any query word, best BM25 score first, with the words each one matched."""
        terms = query_terms(query)
        if not terms:
            return []
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
