"""Keyword search over file name, folder, description and tags: SQLite FTS5 with BM25 ranking.

Matching is case-insensitive and accent-insensitive. Query words of three letters or more also match
as word prefixes ("sun" finds "sunset.jpg"); file names are split at underscores, dashes, dots,
digit/letter and camelCase boundaries, so parts of a name are words of their own. A few English
function words ("a", "the", "of" ...) are ignored in queries.
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
# BM25 weights of the columns id, name, folder, description, tags (id is not searched).
COLUMN_WEIGHTS = (0.0, 2.0, 1.0, 1.0, 3.0)
_WORD = re.compile(r"\w+", re.UNICODE)
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


def query_terms(query: str) -> list[str]:
    terms = [term for term in _WORD.findall(fold(query)) if term not in STOP_WORDS]
    return list(dict.fromkeys(terms))


def name_words(name: str) -> str:
    """A file name and its parts as separate words: 'IMG_0042-beachSunset.jpg' -> '... beach sunset ...'."""
    return " ".join([name, *_NAME_PARTS.findall(name)])


def document_fields(metadata: dict[str, Any]) -> tuple[str, str, str, str]:
    tags = metadata.get("tags") or []
    if isinstance(tags, str):
        tags = [tags]
    return (
        name_words(str(metadata.get("name", ""))),
        str(metadata.get("folder", "")).replace("/", " "),
        str(metadata.get("description", "")),
        " ".join(str(tag) for tag in tags),
    )


class KeywordIndex:
    """An in-memory FTS5 table, one row per image; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute(
            "CREATE VIRTUAL TABLE docs USING fts5("
            "id UNINDEXED, name, folder, description, tags, tokenize='unicode61 remove_diacritics 2')"
        )

    def put(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        rows = [(image_id, *document_fields(metadata)) for image_id, metadata in items]
        with self._lock, self._db:
            self._db.executemany("DELETE FROM docs WHERE id = ?", [(row[0],) for row in rows])
            self._db.executemany("INSERT INTO docs VALUES (?, ?, ?, ?, ?)", rows)

    def remove(self, ids: list[str]) -> None:
        with self._lock, self._db:
            self._db.executemany("DELETE FROM docs WHERE id = ?", [(image_id,) for image_id in ids])

    def search(self, query: str, limit: int | None = None) -> list[KeywordHit]:
        """Images matching any query word, best BM25 score first."""
        terms = query_terms(query)
        if not terms:
            return []
        match = " OR ".join(_match_expression(term) for term in terms)
        weights = ", ".join(str(weight) for weight in COLUMN_WEIGHTS)
        sql = (
            f"SELECT id, -bm25(docs, {weights}), name, folder, description, tags "
            "FROM docs WHERE docs MATCH ? ORDER BY bm25(docs, " + weights + ")"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._db.execute(sql, (match,)).fetchall()
        return [
            KeywordHit(row[0], rank, float(row[1]), _matched(terms, " ".join(row[2:])))
            for rank, row in enumerate(rows, start=1)
        ]


def _match_expression(term: str) -> str:
    quoted = '"' + term.replace('"', '""') + '"'
    return quoted + "*" if len(term) >= PREFIX_MIN_LENGTH else quoted


def _matched(terms: list[str], text: str) -> tuple[str, ...]:
    words = set(_WORD.findall(fold(text)))
    return tuple(
        term
        for term in terms
        if term in words or (len(term) >= PREFIX_MIN_LENGTH and any(word.startswith(term) for word in words))
    )
