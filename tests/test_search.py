"""Issue 3: every query kind, filters, custom metadata, keyword and hybrid ranking, relevance, paging."""

from __future__ import annotations

import base64
import csv
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import make_settings
from data_factory import clustered_vectors, write_tiny_checkpoint
from in_process import run_script

from config import Settings
from errors import FilterError, QueryError, UnknownImage
from filters import parse_filter
from image_retrieval import ImageRetrieval, QueryPart, SearchQuery, data_uri_bytes
from indexer import image_id

ROOT = Path(__file__).resolve().parents[1]


def caption_records(annotations: list[dict]) -> list[dict]:
    return [
        {"path": item["image"], "description": " ".join(item["captions"]), "tags": item["categories"]}
        for item in annotations
    ]


@pytest.fixture(scope="module")
def coco_engine(tmp_path_factory, tiny_checkpoint, coco_source):
    """The captioned photos indexed once, captions imported as description and categories as tags."""
    folder, annotations = coco_source
    tmp = tmp_path_factory.mktemp("search")
    with ImageRetrieval(make_settings(tmp, folder, tiny_checkpoint)) as engine:
        engine.index_folder()
        engine.import_metadata(caption_records(annotations))
        yield engine


def exact_order(engine: ImageRetrieval, vector: np.ndarray, ids: list[str]) -> list[str]:
    scores = engine.store.vectors(ids) @ vector
    return [ids[i] for i in np.lexsort((np.arange(len(ids)), -scores))]


def words_of(metadata: dict, fields: tuple[str, ...]) -> set[str]:
    text = " ".join(
        " ".join(value) if isinstance(value, list) else str(value)
        for value in (metadata.get(field, "") for field in fields)
    )
    return set(re.findall(r"\w+", text.lower()))


def category_words(annotations: list[dict], minimum: int) -> list[str]:
    counts: dict[str, int] = {}
    for item in annotations:
        for category in item["categories"]:
            if " " not in category:
                counts[category] = counts.get(category, 0) + 1
    return sorted(word for word, count in counts.items() if count >= minimum)


# -- query kinds ---------------------------------------------------------------------------------


def test_text_query_ranks_by_cosine(coco_engine):
    result = coco_engine.search_text("a dog playing in the park", top_k=10)
    vector = coco_engine.encoder.encode_texts(["a dog playing in the park"])[0]
    all_ids = [image_id for image_id, _ in coco_engine.store.items()]
    assert [hit.id for hit in result.hits] == exact_order(coco_engine, vector, all_ids)[:10]
    assert [hit.rank for hit in result.hits] == list(range(1, 11))
    for hit in result.hits:
        assert -1.0 <= hit.score <= 1.0
        assert hit.score == pytest.approx(float(coco_engine.store.vector(hit.id) @ vector), abs=1e-5)
        assert hit.path == hit.metadata["path"]


def test_texts_asked_from_many_threads_are_encoded_on_one_as_the_model_encodes_them(encoder, monkeypatch):
    """OpenMP keeps a team of threads per calling thread: a server's request threads all hand their
    texts to one thread, and get the vectors of the model's own `encode_text`."""
    import clip
    import torch

    from clip_encoder import TextTower

    encoded_on: set[str] = set()
    encode_tokens = TextTower.forward

    def recorded(self: TextTower, tokens: torch.Tensor) -> torch.Tensor:
        encoded_on.add(threading.current_thread().name)
        return encode_tokens(self, tokens)

    monkeypatch.setattr(TextTower, "forward", recorded)
    texts = [f"a photo of {count} dogs on a beach" for count in range(24)]
    with ThreadPoolExecutor(max_workers=4) as requests:
        vectors = list(requests.map(lambda text: encoder.encode_texts([text])[0], texts))
    with torch.inference_mode():
        reference = encoder.model.encode_text(clip.tokenize(texts)).float().numpy()
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_allclose(np.stack(vectors), reference, atol=1e-5)
    assert len(encoded_on) == 1 and next(iter(encoded_on)).startswith("text-encoding")


def test_image_query_from_path_bytes_and_data_uri(coco_engine):
    target = coco_engine.store.items()[5][0]
    path = coco_engine.image_path(target)
    data = path.read_bytes()
    data_uri = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    for source in (path, data, data_uri_bytes(data_uri)):
        hit = coco_engine.search_image(source, top_k=1).hits[0]
        assert hit.id == target and hit.score >= 0.999
    with pytest.raises(QueryError, match="not valid base64"):
        data_uri_bytes("data:image/png;base64,@@@")
    with pytest.raises(QueryError, match="cannot be used"):
        coco_engine.search_image(b"definitely not an image")


def test_more_like_this_never_returns_the_query_image(coco_engine):
    for target, _ in coco_engine.store.items()[:25]:
        result = coco_engine.more_like_this(target, top_k=10)
        assert target not in [hit.id for hit in result.hits]
        assert len(result.hits) == 10
        expected = exact_order(
            coco_engine,
            coco_engine.store.vector(target),
            [i for i, _ in coco_engine.store.items() if i != target],
        )
        assert [hit.id for hit in result.hits] == expected[:10]
    with pytest.raises(UnknownImage):
        coco_engine.more_like_this("no-such-id")


def test_combined_query_with_negative_term_moves_matching_images_down(tmp_path, tiny_checkpoint):
    dataset = tmp_path / "empty"
    dataset.mkdir()
    with ImageRetrieval(make_settings(tmp_path, dataset, tiny_checkpoint)) as engine:
        beach, people = engine.encoder.encode_texts(["beach", "people"])
        rng = np.random.default_rng(0)
        people_part = _orthonormal(people, [beach])
        unrelated = _orthonormal(rng.standard_normal(engine.encoder.dim).astype(np.float32), [beach, people])
        beach_with_people = _unit(beach + 0.4 * people_part)
        empty_beach = _unit(beach + 0.5 * unrelated)
        fillers = [_unit(rng.standard_normal(engine.encoder.dim).astype(np.float32)) for _ in range(20)]
        vectors = np.stack([beach_with_people, empty_beach, *fillers])
        ids = ["beach-with-people", "empty-beach", *(f"filler-{i}" for i in range(20))]
        engine.store.write(
            ids, vectors, [{"path": f"{i}.jpg", "name": f"{i}.jpg", "folder": ""} for i in ids]
        )

        plain = [hit.id for hit in engine.search_text("beach", top_k=2).hits]
        assert plain == ["beach-with-people", "empty-beach"]
        combined = engine.search(
            SearchQuery([QueryPart(text="beach"), QueryPart(text="people", weight=-1.0)], top_k=22)
        )
        order = [hit.id for hit in combined.hits]
        assert order.index("empty-beach") < order.index("beach-with-people")
        expected = _unit(beach - people)
        score = next(hit.score for hit in combined.hits if hit.id == "empty-beach")
        assert score == pytest.approx(float(empty_beach @ expected), abs=1e-5)
        with pytest.raises(QueryError, match="cancel"):
            engine.search(SearchQuery([QueryPart(text="beach"), QueryPart(text="beach", weight=-1.0)]))


def _unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def _orthonormal(vector: np.ndarray, against: list[np.ndarray]) -> np.ndarray:
    for other in against:
        other = _unit(other)
        vector = vector - float(vector @ other) * other
    return _unit(vector)


def test_query_validation(coco_engine):
    cases = [
        (SearchQuery([QueryPart(text="x")], top_k=0), "top_k"),
        (SearchQuery([QueryPart(text="x")], top_k=10_000), "top_k"),
        (SearchQuery([QueryPart(text="x")], offset=-1), "offset"),
        (SearchQuery([QueryPart(text="x")], mode="magic"), "mode"),
        (SearchQuery([QueryPart(text="x")], min_score=2.0), "min_score"),
        (SearchQuery([QueryPart(text="x")], cutoff="sometimes"), "cutoff"),
        (SearchQuery([]), "empty"),
        (SearchQuery([QueryPart(text="   ")]), "empty"),
        (SearchQuery([QueryPart(text="x" * 5000)]), "longer"),
        (SearchQuery([QueryPart(text="x", id="y")]), "exactly one"),
        (SearchQuery([QueryPart(text="x")], filters="tags contains"), "FIELD OPERATOR VALUE"),
    ]
    for query, message in cases:
        with pytest.raises(QueryError, match=message):
            coco_engine.search(query)


# -- metadata, filters, keyword and hybrid -------------------------------------------------------


def test_keyword_query_for_a_tag_returns_only_tagged_images_ranked(coco_engine, coco_source):
    for word in category_words(coco_source[1], minimum=3):
        result = coco_engine.search_text(f"tags:{word}", mode="keyword", top_k=200)
        tagged = {
            image_id for image_id, meta in coco_engine.store.items() if word in words_of(meta, ("tags",))
        }
        assert {hit.id for hit in result.hits} == tagged, word
        scores = [hit.keyword_score for hit in result.hits]
        assert scores == sorted(scores, reverse=True)
        assert all(hit.matched_terms == [word] for hit in result.hits)


def test_keyword_query_searches_descriptions_tags_and_names(coco_engine, coco_source):
    word = category_words(coco_source[1], minimum=3)[0]
    result = coco_engine.search_text(word.upper(), mode="keyword", top_k=200)
    expected = {
        image_id
        for image_id, meta in coco_engine.store.items()
        if any(w.startswith(word) for w in words_of(meta, ("tags", "description", "name", "folder")))
    }
    assert {hit.id for hit in result.hits} == expected
    assert [hit.keyword_rank for hit in result.hits] == list(range(1, len(result.hits) + 1))


def test_keyword_finds_partial_file_names_case_insensitively(tmp_path, tiny_checkpoint, coco_source):
    dataset = tmp_path / "named"
    (dataset / "Holidays").mkdir(parents=True)
    photos = sorted(coco_source[0].glob("*.jpg"))
    names = ["beach_Sunset_2021.jpg", "IMG_0042.jpg", "mountainLake.jpg", "Crème brûlée.jpg"]
    for name, photo in zip(names, photos, strict=False):
        (dataset / "Holidays" / name).write_bytes(photo.read_bytes())
    with ImageRetrieval(make_settings(tmp_path, dataset, tiny_checkpoint)) as engine:
        engine.index_folder()

        def found(query: str) -> list[str]:
            return [hit.metadata["name"] for hit in engine.search_text(query, mode="keyword", top_k=10).hits]

        assert found("sunset") == ["beach_Sunset_2021.jpg"]
        assert found("SUN") == ["beach_Sunset_2021.jpg"]
        assert found("lake") == ["mountainLake.jpg"]
        assert found("0042") == ["IMG_0042.jpg"]
        assert found("creme") == ["Crème brûlée.jpg"]
        assert len(found("holidays")) == 4


def test_hybrid_query_explains_each_hit(coco_engine, coco_source):
    word = category_words(coco_source[1], minimum=3)[0]
    query = f"a photo of a {word}"
    result = coco_engine.search_text(query, mode="hybrid", top_k=20)
    keyword_ids = {hit.id: hit for hit in coco_engine.search_text(query, mode="keyword", top_k=200).hits}
    vector_ids = {hit.id: hit for hit in coco_engine.search_text(query, top_k=200).hits}
    assert result.hits
    fused = []
    for hit in result.hits:
        why = hit.as_dict(with_why=True)["why"]
        assert set(why) == {
            "vector_rank",
            "vector_score",
            "keyword_rank",
            "keyword_score",
            "matched_terms",
            "fused_score",
        }
        assert hit.vector_rank == vector_ids[hit.id].rank
        assert why["vector_score"] == pytest.approx(vector_ids[hit.id].score, abs=1e-6)
        if hit.id in keyword_ids:
            assert hit.keyword_rank == keyword_ids[hit.id].rank
            assert hit.matched_terms == keyword_ids[hit.id].matched_terms and hit.matched_terms
        else:
            assert hit.keyword_rank is None and hit.matched_terms == []
        fused.append(sum(1 / (60 + rank) for rank in (hit.vector_rank, hit.keyword_rank) if rank))
        assert hit.fused_score == pytest.approx(fused[-1]) and why["fused_score"] == round(fused[-1], 6)
    assert fused == sorted(fused, reverse=True)
    assert any(hit.keyword_rank for hit in result.hits)
    assert all(hit["why"] for hit in result.hit_dicts())


@pytest.mark.parametrize("mode", ["keyword", "hybrid"])
def test_a_query_without_text_ranks_by_vector_in_any_mode(coco_engine, mode):
    """An image, an id, or only negative text: no words to match, so the vector ranking and a note."""
    some_id = next(iter(coco_engine.store.items()))[0]
    for parts in (
        [QueryPart(id=some_id)],
        [QueryPart(id=some_id), QueryPart(text="people", weight=-0.5)],
    ):
        vector = coco_engine.search(SearchQuery(parts, top_k=6))
        asked = coco_engine.search(SearchQuery(parts, top_k=6, mode=mode))
        assert asked.mode == "vector" and vector.note is None
        assert mode in asked.note and "vector" in asked.note
        assert [(hit.id, hit.score) for hit in asked.hits] == [(hit.id, hit.score) for hit in vector.hits]
        assert all(hit.fused_score is None for hit in asked.hits)
        assert "why" not in asked.hit_dicts()[0]
    with_words = coco_engine.search(SearchQuery([QueryPart(text="a dog")], top_k=3, mode=mode))
    assert with_words.mode == mode and with_words.note is None


def test_filter_keeps_only_tagged_images_in_exact_cosine_order(coco_engine, coco_source):
    word = "dog" if "dog" in category_words(coco_source[1], 2) else category_words(coco_source[1], 2)[0]
    for exact_max in (20_000, 2):
        coco_engine.settings = coco_engine.settings.with_overrides(EXACT_SEARCH_MAX=exact_max)
        result = coco_engine.search_text("a dog", filters=f'tags contains "{word}"', top_k=100)
        tagged = [i for i, meta in coco_engine.store.items() if word in (meta.get("tags") or [])]
        vector = coco_engine.encoder.encode_texts(["a dog"])[0]
        assert [hit.id for hit in result.hits] == exact_order(coco_engine, vector, tagged)
        assert result.filtered_total == len(tagged)
    coco_engine.settings = coco_engine.settings.with_overrides(EXACT_SEARCH_MAX=Settings().EXACT_SEARCH_MAX)


def test_filter_operators_and_both_syntaxes_agree(coco_engine):
    items = coco_engine.store.items()
    sizes = sorted(meta["file_size"] for _, meta in items)
    median = sizes[len(sizes) // 2]
    cases = [
        (f"file_size >= {median}", {"file_size": {"$gte": median}}, lambda m: m["file_size"] >= median),
        (f"file_size<{median}", {"file_size": {"$lt": median}}, lambda m: m["file_size"] < median),
        ("format = JPEG", {"format": "JPEG"}, lambda m: m["format"] == "JPEG"),
        ("tags contains PERSON", {"tags": {"$contains": "person"}}, lambda m: "person" in m.get("tags", [])),
        (
            "tags in cat|dog",
            {"tags": {"$in": ["cat", "dog"]}},
            lambda m: {"cat", "dog"} & set(m.get("tags", [])),
        ),
        ("folder prefix ''", {"folder": {"$prefix": ""}}, lambda m: True),
        ("modified > 2000-01-01", {"modified": {"$gt": "2000-01-01"}}, lambda m: True),
        ("modified < 2000-01-01", {"modified": {"$lt": "2000-01-01"}}, lambda m: False),
        (
            f"tags contains person and width > 500 and file_size != {sizes[0]}",
            {"tags": {"$contains": "person"}, "width": {"$gt": 500}, "file_size": {"$ne": sizes[0]}},
            lambda m: "person" in m.get("tags", []) and m["width"] > 500 and m["file_size"] != sizes[0],
        ),
    ]
    for text, obj, predicate in cases:
        expected = {image_id for image_id, meta in items if predicate(meta)}
        for spec in (text, obj):
            result = coco_engine.search_text("people", filters=spec, top_k=200, collapse_duplicates=False)
            assert {hit.id for hit in result.hits} == expected, spec
    for bad in ("width >>> 3", "tags contains", {"width": {"$near": 3}}, {"": 1}, 42):
        with pytest.raises(FilterError):
            parse_filter(bad)


def test_folder_prefix_filter(tmp_path, tiny_checkpoint, coco_source):
    dataset = tmp_path / "folders"
    photos = sorted(coco_source[0].glob("*.jpg"))
    for index, folder in enumerate(["cats", "cats/kittens", "dogs", "catsanddogs"]):
        (dataset / folder).mkdir(parents=True)
        (dataset / folder / "photo.jpg").write_bytes(photos[index].read_bytes())
    with ImageRetrieval(make_settings(tmp_path, dataset, tiny_checkpoint)) as engine:
        engine.index_folder()
        folders = {
            hit.metadata["folder"]
            for hit in engine.search_text("x", filters="folder prefix cats/", top_k=9).hits
        }
        assert folders == {"cats/kittens"}
        folders = {
            hit.metadata["folder"]
            for hit in engine.search_text("x", filters="folder prefix cats", top_k=9).hits
        }
        assert folders == {"cats", "cats/kittens", "catsanddogs"}
        folders = {
            hit.metadata["folder"] for hit in engine.search_text("x", filters="folder = dogs", top_k=9).hits
        }
        assert folders == {"dogs"}


def test_metadata_import_from_csv_json_and_dataset_file(tmp_path, tiny_checkpoint, coco_source):
    dataset = tmp_path / "archive"
    (dataset / "scans").mkdir(parents=True)
    photos = sorted(coco_source[0].glob("*.jpg"))[:4]
    names = ["a.jpg", "scans/b.jpg", "scans/c.jpg", "d.jpg"]
    for name, photo in zip(names, photos, strict=True):
        (dataset / name).write_bytes(photo.read_bytes())
    settings = make_settings(tmp_path, dataset, tiny_checkpoint)
    csv_file = tmp_path / "records.csv"
    with open(csv_file, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "description", "tags", "patient_age", "path_ignored"])
        writer.writerow(["a.jpg", "Chest X-ray, frontal", "xray|chest", "54", "x"])
        writer.writerow(["c.jpg", "Hand X-ray", "xray|hand", "7", ""])
        writer.writerow(["missing.jpg", "nothing", "", "", ""])
    env_run = run_script("embed_images.py", ["--quiet", "--metadata", str(csv_file)], _env(settings))
    assert env_run.returncode == 0, env_run.stderr
    assert "2 matched" in env_run.stdout and "1 unmatched" in env_run.stdout
    with ImageRetrieval(settings) as engine:
        meta = engine.store.metadata(image_id("a.jpg"))
        assert meta["description"] == "Chest X-ray, frontal" and meta["tags"] == ["xray", "chest"]
        assert meta["patient_age"] == 54
        assert engine.store.metadata(image_id("scans/c.jpg"))["tags"] == ["xray", "hand"]
        before = engine.store.vectors([image_id("a.jpg")])
        hits = engine.search_text("x", filters="patient_age >= 18 and tags contains xray", top_k=5).hits
        assert [hit.path for hit in hits] == ["a.jpg"]

        json_records = [{"path": "scans/b.jpg", "tags": ["xray", "knee"], "description": "Knee"}]
        (tmp_path / "more.json").write_text(json.dumps(json_records))
        from metadata_import import read_metadata_file

        summary = engine.import_metadata(read_metadata_file(tmp_path / "more.json"))
        assert summary.updated == 1
        summary = engine.import_metadata(read_metadata_file(csv_file))
        assert summary.updated == 0
        assert np.array_equal(engine.store.vectors([image_id("a.jpg")]), before)

    (dataset / "metadata.csv").write_text("path,description\nd.jpg,Found by itself\n")
    rerun = run_script("embed_images.py", ["--quiet"], _env(settings))
    assert rerun.returncode == 0 and "encoded 0" in rerun.stdout
    with ImageRetrieval(settings) as engine:
        assert engine.store.metadata(image_id("d.jpg"))["description"] == "Found by itself"
        assert engine.store.metadata(image_id("a.jpg"))["patient_age"] == 54
        assert [hit.path for hit in engine.search_text("knee", mode="keyword").hits] == ["scans/b.jpg"]


def test_bad_metadata_file_is_a_clear_error(tmp_path, tiny_checkpoint, coco_source):
    dataset = tmp_path / "few"
    dataset.mkdir()
    (dataset / "a.jpg").write_bytes(next(coco_source[0].glob("*.jpg")).read_bytes())
    settings = make_settings(tmp_path, dataset, tiny_checkpoint)
    for name, content, message in [
        ("no_path.csv", "file_name,description\na.jpg,x\n", "needs a 'path' column"),
        ("broken.json", "[{", "not valid JSON"),
        ("wrong.json", '{"a": 1}', "list of objects"),
    ]:
        (tmp_path / name).write_text(content)
        run = run_script("embed_images.py", ["--quiet", "--metadata", str(tmp_path / name)], _env(settings))
        assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr


def _env(settings) -> dict[str, str]:
    import os

    keys = ("DATASET_FOLDER", "CHROMA_DB_PATH", "MODEL_NAME", "DEVICE")
    return {**os.environ, **{key: str(getattr(settings, key)) for key in keys}}


# -- results: relevance, duplicates, paging ------------------------------------------------------


def test_min_score_and_adaptive_cutoff(coco_engine):
    full = coco_engine.search_text("a red car", top_k=100).hits
    floor = full[10].score
    cut = coco_engine.search_text("a red car", top_k=100, min_score=floor).hits
    assert [hit.id for hit in cut] == [hit.id for hit in full if hit.score >= floor]
    adaptive = coco_engine.search_text("a red car", top_k=100, cutoff="adaptive").hits
    scores = [hit.score for hit in full]
    threshold = scores[0] - 0.5 * (scores[0] - float(np.median(scores)))
    assert [hit.id for hit in adaptive] == [hit.id for hit in full if hit.score >= threshold]
    assert 0 < len(adaptive) < len(full)


def test_near_duplicates_are_collapsed_into_the_best(tmp_path, tiny_checkpoint):
    dataset = tmp_path / "empty"
    dataset.mkdir()
    settings = make_settings(tmp_path, dataset, tiny_checkpoint, DUPLICATE_THRESHOLD=0.97)
    with ImageRetrieval(settings) as engine:
        rng = np.random.default_rng(3)
        dim = engine.encoder.dim
        base = [_unit(rng.standard_normal(dim).astype(np.float32)) for _ in range(3)]
        query = _unit(base[0] + 0.3 * base[1])
        twin = _unit(base[0] + 0.1 * _orthonormal(rng.standard_normal(dim).astype(np.float32), [base[0]]))
        ids = ["original", "near-copy", "other", "third"]
        vectors = np.stack([base[0], twin, base[1], base[2]])
        engine.store.write(
            ids, vectors, [{"path": f"{i}.jpg", "name": f"{i}.jpg", "folder": ""} for i in ids]
        )
        assert float(base[0] @ twin) >= 0.97

        collapsed = engine.search(SearchQuery([QueryPart(vector=query)], top_k=3))
        assert [hit.id for hit in collapsed.hits] == ["original", "other", "third"]
        assert collapsed.hits[0].duplicates == ["near-copy"]
        every = engine.search(SearchQuery([QueryPart(vector=query)], top_k=4, collapse_duplicates=False))
        assert [hit.id for hit in every.hits] == ["original", "near-copy", "other", "third"]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"mode": "keyword"},
        {"mode": "hybrid"},
        {"filters": "tags contains person"},
        {"cutoff": "adaptive"},
    ],
)
def test_pages_do_not_overlap_and_add_up_to_the_top(coco_engine, options):
    k = 7
    query = "people sitting at a table with food"
    first = coco_engine.search_text(query, top_k=k, **options)
    second = coco_engine.search_text(query, top_k=k, offset=k, **options)
    both = coco_engine.search_text(query, top_k=2 * k, **options)
    first_ids, second_ids = [hit.id for hit in first.hits], [hit.id for hit in second.hits]
    assert not set(first_ids) & set(second_ids)
    assert first_ids + second_ids == [hit.id for hit in both.hits]
    assert [hit.rank for hit in second.hits] == list(range(k + 1, k + 1 + len(second.hits)))


@pytest.mark.slow
def test_recall_against_exact_search_on_100k_clustered_vectors(tmp_path):
    """Top-10 ranked exactly over the mirror is numpy's exact cosine top-10; from the HNSW graph
    (EXACT_SEARCH_MAX 0), it agrees with it."""
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny512.pt", embed_dim=512)
    dataset = tmp_path / "none"
    dataset.mkdir()
    with ImageRetrieval(make_settings(tmp_path, dataset, checkpoint)) as engine:
        vectors, _ = clustered_vectors(100_000, 512)
        ids = [f"v{i}" for i in range(len(vectors))]
        metadatas = [
            {"path": f"{name}.jpg", "name": f"{name}.jpg", "folder": "", "bucket": i % 100}
            for i, name in enumerate(ids)
        ]
        for start in range(0, len(ids), 5000):
            end = start + 5000
            engine.store.write(ids[start:end], vectors[start:end], metadatas[start:end])
        rng = np.random.default_rng(7)
        near_images = vectors[rng.integers(0, len(vectors), 50)]
        near_images = near_images + rng.standard_normal(near_images.shape).astype(np.float32) * 0.03
        # Like a CLIP text query: its best images score about 0.3, well above a flat background.
        text_like = vectors[rng.integers(0, len(vectors), 50)]
        text_like = text_like + rng.standard_normal(text_like.shape).astype(np.float32) * 3 / np.sqrt(512)
        queries = np.concatenate([near_images, text_like])
        for exact_max, floor in [(Settings().EXACT_SEARCH_MAX, 1.0), (0, 0.97)]:
            engine.settings = engine.settings.with_overrides(EXACT_SEARCH_MAX=exact_max)
            for filters, selected in [(None, len(ids)), ("bucket < 50", 50_000), ("bucket < 10", 10_000)]:
                allowed = np.array([i % 100 < selected * 100 // len(ids) for i in range(len(ids))])
                found = 0
                for query in queries:
                    query = _unit(query)
                    result = engine.search(
                        SearchQuery(
                            [QueryPart(vector=query)], top_k=10, filters=filters, collapse_duplicates=False
                        )
                    )
                    scores = np.where(allowed, vectors @ query, -np.inf)
                    exact = set(np.argpartition(-scores, 10)[:10].tolist())
                    found += len(exact & {int(hit.id[1:]) for hit in result.hits})
                # The graph's target (0.99) is measured in bench/index_quality.py; it is built by parallel
                # inserts, so builds in loaded runs scored 0.979 and 0.989 (usually 0.999); a real loss, such
                # as ef_search 128's 0.77 on text-like queries (bench/RESULTS.md), still fails here.
                assert found / (10 * len(queries)) >= floor, (exact_max, filters)
