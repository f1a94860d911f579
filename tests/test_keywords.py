"""The keyword index on its own: BM25 order, field scopes, rows replaced and removed."""

from __future__ import annotations

import sqlite3
import threading

from keywords import KeywordIndex, name_words, query_terms


def new_index() -> KeywordIndex:
    return KeywordIndex(sqlite3.connect(":memory:"), threading.RLock())


def document(name: str, description: str = "", tags: list[str] | None = None) -> dict:
    return {"name": name, "folder": "", "description": description, "tags": tags or []}


def test_bm25_ranks_more_relevant_documents_first():
    index = new_index()
    index.put(
        [
            (1, "once", document("a.jpg", "a dog on a beach with people and umbrellas and towels")),
            (2, "twice", document("b.jpg", "dog and another dog")),
            (3, "tagged", document("c.jpg", "an animal", ["dog"])),
            (4, "none", document("d.jpg", "a cat")),
        ]
    )
    hits = index.search("dogs")
    assert [hit.id for hit in hits][-1] == "once"
    assert {hit.id for hit in hits} == {"once", "twice", "tagged"}
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    assert [hit.id for hit in index.search("tags:dog")] == ["tagged"]


def test_query_words_and_file_name_parts():
    assert [term.word for term in query_terms("The Dogs of a PARK")] == ["dogs", "park"]
    assert [(term.field, term.word) for term in query_terms("tags:cat name:img")] == [
        ("tags", "cat"),
        ("name", "img"),
    ]
    assert name_words("IMG_0042-beachSunset.jpg").split()[1:] == ["IMG", "0042", "beach", "Sunset", "jpg"]


def test_a_row_put_again_replaces_its_words_and_a_removed_row_matches_nothing():
    index = new_index()
    index.put(
        [
            (1, "a", document("old_name.jpg")),
            (2, "b", document("deleted.jpg")),
            (3, "c", document("kept.jpg")),
        ]
    )
    index.put([(1, "a", document("new_name.jpg"))])
    index.remove([2])
    assert [hit.id for hit in index.search("new_name")] == ["a"]
    assert index.search("old_name") == []
    assert index.search("deleted") == []
    assert [hit.id for hit in index.search("kept")] == ["c"]
