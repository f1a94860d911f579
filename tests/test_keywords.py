"""The keyword index on its own: BM25 order, field scopes, and building it while writes arrive."""

from __future__ import annotations

from keywords import KeywordIndex, name_words, query_terms


def document(name: str, description: str = "", tags: list[str] | None = None) -> dict:
    return {"name": name, "folder": "", "description": description, "tags": tags or []}


def test_bm25_ranks_more_relevant_documents_first():
    index = KeywordIndex()
    index.put(
        [
            ("once", document("a.jpg", "a dog on a beach with people and umbrellas and towels")),
            ("twice", document("b.jpg", "dog and another dog")),
            ("tagged", document("c.jpg", "an animal", ["dog"])),
            ("none", document("d.jpg", "a cat")),
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


def test_writes_made_during_a_background_build_win_over_the_snapshot():
    index = KeywordIndex()
    snapshot = [("a", document("old_name.jpg")), ("b", document("deleted.jpg")), ("c", document("kept.jpg"))]
    index._ready.clear()
    index.put([("a", document("new_name.jpg"))])
    index.remove(["b"])
    index._build(snapshot)
    assert [hit.id for hit in index.search("new_name")] == ["a"]
    assert index.search("old_name") == []
    assert index.search("deleted") == []
    assert [hit.id for hit in index.search("kept")] == ["c"]


def test_background_build_completes_before_searches_answer():
    index = KeywordIndex()
    snapshot = [(f"id{i}", document(f"photo_{i}.jpg", "a red bicycle")) for i in range(5000)]
    index.build_in_background(snapshot)
    assert len(index.search("bicycle")) == 5000
