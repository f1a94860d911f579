"""Issue 4: the HTTP API, over real HTTP against `python api.py` (and the Flask test client)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from api_server import ApiServer, settings_env
from conftest import make_settings, write_json
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_openapi
from PIL import Image

from config import Settings

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = 24
THUMBNAIL_SIZE = 64
MAX_IMAGE_MEGAPIXELS = 2.0
MAX_UPLOAD_MB = 1.0


# -- helpers -------------------------------------------------------------------------------------


def copy_photos(source: tuple[Path, list[dict]], dest: Path, start: int, count: int) -> list[dict]:
    """Copy `count` captioned photos into `dest`; returns their annotations."""
    folder, annotations = source
    dest.mkdir(parents=True, exist_ok=True)
    chosen = annotations[start : start + count]
    for annotation in chosen:
        shutil.copy(folder / annotation["image"], dest / annotation["image"])
    return chosen


def metadata_records(annotations: list[dict]) -> list[dict]:
    return [
        {"path": item["image"], "description": item["captions"][0], "tags": item["categories"]}
        for item in annotations
    ]


def index_and_wait(url: str, body: dict | None = None, headers: dict | None = None) -> dict:
    started = requests.post(f"{url}/index", json=body, headers=headers, timeout=30)
    assert started.status_code == 202, started.text
    return wait_for_index(url, headers)


def wait_for_index(url: str, headers: dict | None = None, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{url}/index", headers=headers, timeout=30).json()
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError("indexing did not finish")


def search(url: str, expected: int = 200, **body) -> dict:
    response = requests.post(f"{url}/search", json=body, timeout=60)
    assert response.status_code == expected, response.text
    return response.json()


def data_uri(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def decoded_thumbnail(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def png_bytes(size: tuple[int, int], colour: str = "white") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


class SearchLoad:
    """Clients searching in threads, each `per_client` times (and with `keep_going`, until `stop()`)."""

    def __init__(
        self, url: str, clients: int, per_client: int, queries: list[str], keep_going: bool = False
    ) -> None:
        self.url, self.per_client, self.queries = url, per_client, queries
        self.errors: list[str] = []
        self.completed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if not keep_going:
            self._stop.set()
        self._threads = [threading.Thread(target=self._client, args=(n,)) for n in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self, number: int) -> None:
        with requests.Session() as session:
            sent = 0
            while sent < self.per_client or not self._stop.is_set():
                query = self.queries[(number + sent) % len(self.queries)]
                self._record(self._search(session, query))
                sent += 1

    def _search(self, session: requests.Session, query: str) -> str | None:
        try:
            response = session.post(f"{self.url}/search", json={"query": query, "top_k": 5}, timeout=60)
        except requests.RequestException as error:
            return str(error)
        if response.status_code == 200 and response.json()["results"]:
            return None
        return f"{response.status_code}: {response.text[:200]}"

    def _record(self, problem: str | None) -> None:
        with self._lock:
            self.completed += 1
            if problem:
                self.errors.append(problem)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=600)


# -- the shared server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory, coco_source) -> tuple[Path, list[dict]]:
    dataset = tmp_path_factory.mktemp("api") / "dataset"
    annotations = copy_photos(coco_source, dataset, 0, PHOTOS)
    (dataset / "sub").mkdir()
    shutil.move(dataset / annotations[-1]["image"], dataset / "sub" / annotations[-1]["image"])
    annotations[-1] = {**annotations[-1], "image": f"sub/{annotations[-1]['image']}"}
    return dataset, annotations


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint, photos):
    dataset, annotations = photos
    settings = make_settings(
        tmp_path_factory.mktemp("api-db"),
        dataset,
        tiny_checkpoint,
        THUMBNAIL_SIZE=THUMBNAIL_SIZE,
        MAX_IMAGE_MEGAPIXELS=MAX_IMAGE_MEGAPIXELS,
        MAX_UPLOAD_MB=MAX_UPLOAD_MB,
        RATE_LIMIT_PER_MINUTE=0,
    )
    with ApiServer(settings) as running:
        job = index_and_wait(running.url, {"metadata": metadata_records(annotations)})
        assert job["state"] == "done", job
        yield running


@pytest.fixture(scope="module")
def openapi(server) -> dict:
    return requests.get(f"{server.url}/openapi.json", timeout=10).json()


def assert_matches_schema(document: dict, schema_name: str, instance: dict) -> None:
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
    OAS30Validator(schema).validate(instance)


def ids_by_path(url: str) -> dict[str, str]:
    """Every indexed image's id by path (via a search for all of them)."""
    found = search(url, query="a photo", top_k=200, collapse_duplicates=False, include_images="none")
    return {hit["path"]: hit["id"] for hit in found["results"]}


# -- endpoints -----------------------------------------------------------------------------------


def test_health_and_index_status(server, photos, openapi):
    health = requests.get(f"{server.url}/", timeout=10).json()
    assert health["status"] == "ok" and health["images"] == PHOTOS
    assert health["device"] == "cpu" and health["collection"] == "image_embeddings"
    assert health["model"].startswith("tiny-clip.pt#") and health["indexing"] == "done"
    assert (health["max_top_k"], health["max_offset"], health["max_query_chars"]) == (200, 10000, 1000)
    assert (health["max_upload_mb"], health["max_image_megapixels"]) == (MAX_UPLOAD_MB, MAX_IMAGE_MEGAPIXELS)
    assert_matches_schema(openapi, "Health", health)
    job = requests.get(f"{server.url}/index", timeout=10).json()
    assert job["state"] == "done" and job["total"] == job["done"] == PHOTOS
    assert job["summary"]["added"] == PHOTOS and job["summary_line"].startswith(f"added {PHOTOS}, ")
    assert job["metadata_line"].startswith(f"metadata: {PHOTOS} records, {PHOTOS} matched")
    assert job["error"] is None and job["started_at"] <= job["finished_at"]
    assert_matches_schema(openapi, "IndexStatus", job)


def test_get_root_reports_the_limits_that_requests_are_held_to(tmp_path, tiny_checkpoint, encoder, photos):
    from api import create_app
    from image_retrieval import ImageRetrieval

    limits = {"MAX_TOP_K": 30, "MAX_OFFSET": 90, "MAX_QUERY_CHARS": 50, "MAX_QUERY_PARTS": 3}
    settings = make_settings(tmp_path, photos[0], tiny_checkpoint, MAX_UPLOAD_MB=2.5, **limits)
    with ImageRetrieval(settings, encoder=encoder, role="api") as engine:
        client = create_app(settings, engine).test_client()
        health = client.get("/").get_json()
        document = client.get("/openapi.json").get_json()
        answers = {
            "top_k 30": client.post("/search", json={"query": "a dog", "top_k": 30}),
            "top_k 31": client.post("/search", json={"query": "a dog", "top_k": 31}),
            "offset 91": client.post("/search", json={"query": "a dog", "offset": 91}),
            "51 chars": client.post("/search", json={"query": "d" * 51}),
            "4 parts": client.post("/search", json={"parts": [{"text": "a dog"}] * 4}),
        }
    assert {name: health[name.lower()] for name in limits} == limits
    assert health["max_upload_mb"] == 2.5 and health["max_previews"] == 24 and health["max_part_weight"] == 10
    assert_matches_schema(document, "Health", health)
    assert document["components"]["schemas"]["SearchRequest"]["properties"]["top_k"]["maximum"] == 30
    assert {name: answer.status_code for name, answer in answers.items()} == {
        "top_k 30": 200,
        "top_k 31": 400,
        "offset 91": 400,
        "51 chars": 400,
        "4 parts": 400,
    }
    assert "from 1 to 30" in answers["top_k 31"].get_json()["error"]
    assert "0 to 90" in answers["offset 91"].get_json()["error"]


def test_text_search_returns_ranked_thumbnails(server, photos, openapi):
    dataset, _ = photos
    started = time.perf_counter()
    answer = requests.post(
        f"{server.url}/search", json={"query": "a dog playing in the park", "top_k": 5}, timeout=60
    )
    elapsed_ms = (time.perf_counter() - started) * 1000
    stages = dict(
        re.fullmatch(r"(\w+);dur=([\d.]+)", part).groups()
        for part in answer.headers["Server-Timing"].split(", ")
    )
    assert list(stages) == ["encode", "rank", "pictures"]
    assert float(stages["encode"]) > 0 and sum(map(float, stages.values())) < elapsed_ms
    found = search(server.url, query="a dog playing in the park", top_k=5, offset=None, filters=None)
    assert_matches_schema(openapi, "SearchResponse", found)
    assert found == answer.json()
    assert found["query"] == "a dog playing in the park" and found["mode"] == "vector"
    assert found["total_results"] == len(found["results"]) == 5 and found["has_more"] is True
    assert found["total"] == PHOTOS and found["total_exact"] is False  # estimated: not all ranked
    everything = search(server.url, query="a dog", top_k=10, include_images="none")
    assert everything["total"] == PHOTOS and everything["total_exact"] is True
    assert [hit["rank"] for hit in found["results"]] == [1, 2, 3, 4, 5]
    scores = [hit["score"] for hit in found["results"]]
    assert scores == sorted(scores, reverse=True)
    for hit in found["results"]:
        assert (dataset / hit["path"]).is_file() and not Path(hit["path"]).is_absolute()
        assert hit["metadata"]["path"] == hit["path"] and "tags" in hit["metadata"]
        assert (
            hit["thumbnail_url"] == f"/thumbnails/{hit['id']}" and hit["image_url"] == f"/images/{hit['id']}"
        )
        thumbnail = decoded_thumbnail(hit["image"])
        assert thumbnail.format == "JPEG" and max(thumbnail.size) == THUMBNAIL_SIZE
        with Image.open(dataset / hit["path"]) as original:
            assert abs(thumbnail.width / thumbnail.height - original.width / original.height) < 0.05


def test_a_page_of_large_small_cached_and_missing_images_gets_each_its_own_thumbnail(
    tmp_path, tiny_checkpoint, encoder, photos, monkeypatch
):
    import api
    from image_retrieval import ImageRetrieval

    dataset = tmp_path / "mixed"
    large = [item["image"] for item in copy_photos(photos, dataset, 0, 5)]
    colours = ["red", "green", "blue", "yellow", "purple"]
    for colour in colours:
        (dataset / f"{colour}.png").write_bytes(png_bytes((40, 30), colour))
    names = {file.stat().st_ino: file.name for file in dataset.iterdir()}
    made_in: dict[str, str] = {}
    make = api.thumbnail_jpeg

    def recorded(source, *args):
        made_in[names[os.fstat(source.fileno()).st_ino]] = threading.current_thread().name
        return make(source, *args)

    monkeypatch.setattr(api, "thumbnail_jpeg", recorded)
    settings = make_settings(tmp_path, dataset, tiny_checkpoint)
    with ImageRetrieval(settings, encoder=encoder, role="api") as engine:
        engine.index_folder()
        (dataset / large[0]).unlink()
        (dataset / "red.png").unlink()
        client = api.create_app(settings, engine).test_client()
        first = client.post("/search", json={"query": "a photo", "top_k": 10}).get_json()["results"]
        made_first = dict(made_in)
        made_in.clear()
        again = client.post("/search", json={"query": "a photo", "top_k": 10}).get_json()["results"]

    pictures = {hit["path"]: hit["image"] for hit in first}
    assert set(pictures) == set(large) | {f"{colour}.png" for colour in colours}
    assert pictures[large[0]] is None and pictures["red.png"] is None
    for colour in colours[1:]:
        thumbnail = decoded_thumbnail(pictures[f"{colour}.png"])
        assert thumbnail.size == (40, 30)
        assert thumbnail.getpixel((20, 15)) == pytest.approx(
            Image.new("RGB", (1, 1), colour).getpixel((0, 0)), abs=8
        )
    for name in large[1:]:
        with Image.open(dataset / name) as original:
            thumbnail = decoded_thumbnail(pictures[name])
            assert abs(thumbnail.width / thumbnail.height - original.width / original.height) < 0.05
    request_thread = threading.current_thread().name
    assert {name for name, thread in made_first.items() if thread == request_thread} == {
        f"{colour}.png" for colour in colours[1:]
    }
    assert {name for name, thread in made_first.items() if thread.startswith("thumbnails")} == set(large[1:])
    assert made_in == {} and {hit["path"]: hit["image"] for hit in again} == pictures


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, **options)
    return out.getvalue()


def small_jpegs() -> dict[str, bytes]:
    """JPEGs no larger than the thumbnail (but the last), one plain and the others each with a reason
    to be made again: EXIF (turned, or located), a comment, CMYK, an oversized profile, large."""
    scene = Image.new("RGB", (40, 30), "navy")
    scene.paste(Image.new("RGB", (20, 30), "orange"))
    turned, located = Image.Exif(), Image.Exif()
    turned[0x0112] = 6
    located.get_ifd(0x8825)[2] = (48.0, 51.0, 0.0)
    return {
        "plain.jpg": jpeg_bytes(scene),
        "turned.jpg": jpeg_bytes(scene, exif=turned),
        "located.jpg": jpeg_bytes(scene, exif=located),
        "commented.jpg": jpeg_bytes(scene, comment=b"made by hand"),
        "cmyk.jpg": jpeg_bytes(scene.convert("CMYK")),
        "profiled.jpg": jpeg_bytes(scene, icc_profile=bytes(8192)),
        "large.jpg": jpeg_bytes(scene.resize((160, 120))),
    }


def test_a_small_plain_jpeg_is_its_own_thumbnail_and_others_are_made_upright_without_metadata(
    tmp_path, tiny_checkpoint, encoder
):
    import api
    from image_retrieval import ImageRetrieval
    from indexer import image_id

    dataset = tmp_path / "small"
    dataset.mkdir()
    files = small_jpegs()
    for name, data in files.items():
        (dataset / name).write_bytes(data)
    settings = make_settings(tmp_path, dataset, tiny_checkpoint, THUMBNAIL_SIZE=THUMBNAIL_SIZE)
    with ImageRetrieval(settings, encoder=encoder, role="api") as engine:
        engine.index_folder()
        client = api.create_app(settings, engine).test_client()
        served = {name: client.get(f"/thumbnails/{image_id(name)}").data for name in files}
        body = {"query": "a flag", "top_k": 10, "collapse_duplicates": False}
        hits = client.post("/search", json=body).get_json()["results"]

    inline = {hit["path"]: base64.b64decode(hit["image"].split(",", 1)[1]) for hit in hits}
    assert inline == served
    assert served["plain.jpg"] == files["plain.jpg"]
    for name in set(files) - {"plain.jpg"}:
        assert served[name] != files[name], name
        with Image.open(io.BytesIO(served[name])) as thumbnail:
            assert thumbnail.format == "JPEG" and thumbnail.mode == "RGB", name
            assert not {"exif", "comment", "icc_profile"} & set(thumbnail.info), name
            expected = {"turned.jpg": (30, 40), "large.jpg": (64, 48)}.get(name, (40, 30))
            assert thumbnail.size == expected, name
            orange = (15, 5) if name == "turned.jpg" else (5, 15)  # turned: the left half on top
            assert thumbnail.convert("RGB").resize(expected).getpixel(orange) == pytest.approx(
                (255, 165, 0), abs=40
            ), name


def test_image_query_by_upload_and_by_data_uri(server, photos):
    dataset, annotations = photos
    path = dataset / annotations[3]["image"]
    with open(path, "rb") as file:
        response = requests.post(
            f"{server.url}/search",
            files={"image": (path.name, file, "image/jpeg")},
            data={"top_k": "3", "collapse_duplicates": "false", "include_images": "none"},
            timeout=60,
        )
    assert response.status_code == 200, response.text
    uploaded = response.json()
    assert uploaded["query"] is None and uploaded["top_k"] == 3 and len(uploaded["results"]) == 3
    assert uploaded["results"][0]["path"] == annotations[3]["image"]
    assert uploaded["results"][0]["score"] >= 0.999 and "image" not in uploaded["results"][0]
    by_uri = search(server.url, image=data_uri(path), top_k=3, collapse_duplicates=False)
    assert [hit["id"] for hit in by_uri["results"]] == [hit["id"] for hit in uploaded["results"]]
    plain_base64 = base64.b64encode(path.read_bytes()).decode()
    assert search(server.url, image=plain_base64, top_k=1)["results"][0]["path"] == annotations[3]["image"]


def test_similar_to_an_indexed_image(server, photos):
    _, annotations = photos
    ids = ids_by_path(server.url)
    target = ids[annotations[5]["image"]]
    found = search(server.url, similar_to=target, top_k=PHOTOS, collapse_duplicates=False)
    result_ids = [hit["id"] for hit in found["results"]]
    assert target not in result_ids and len(result_ids) == PHOTOS - 1 and found["has_more"] is False
    by_image = search(
        server.url,
        image=data_uri(photos[0] / annotations[5]["image"]),
        top_k=PHOTOS,
        collapse_duplicates=False,
    )
    assert by_image["results"][0]["id"] == target
    expected = [hit["score"] for hit in by_image["results"][1:]]
    assert [hit["score"] for hit in found["results"]] == pytest.approx(expected, abs=1e-3)


def test_combined_parts_with_negative_weight(server, photos):
    """Scores of a weighted sum follow from the parts: text t and image x give (t ± w·x) / |t ± w·x|."""
    dataset, _ = photos
    best = search(server.url, query="a red bus", top_k=1, include_images="none")["results"][0]
    image = data_uri(dataset / best["path"])
    similarity = best["score"]
    everything = {"top_k": 200, "collapse_duplicates": False, "include_images": "none"}
    pushed = search(server.url, query="a red bus", parts=[{"image": image, "weight": -1}], **everything)
    score = {hit["id"]: hit["score"] for hit in pushed["results"]}[best["id"]]
    assert len(pushed["results"]) == PHOTOS and pushed["query"] == "a red bus"
    assert score == pytest.approx(-np.sqrt((1 - similarity) / 2), abs=2e-3)
    pulled = search(server.url, parts=[{"text": "a red bus"}, {"image": image, "weight": 2}], **everything)
    assert pulled["results"][0]["id"] == best["id"] and pulled["query"] is None
    expected = (similarity + 2) / np.sqrt(5 + 4 * similarity)
    assert pulled["results"][0]["score"] == pytest.approx(expected, abs=2e-3)


def test_filters_in_text_and_object_form(server, photos):
    _, annotations = photos
    tag = max(
        {tag for item in annotations for tag in item["categories"]},
        key=lambda tag: sum(tag in item["categories"] for item in annotations),
    )
    tagged = {item["image"] for item in annotations if tag in item["categories"]}
    assert 0 < len(tagged) < PHOTOS
    options = {"query": "a photo", "top_k": 200, "collapse_duplicates": False, "include_images": "none"}
    as_text = search(server.url, filters=f'tags contains "{tag}"', **options)
    assert {hit["path"] for hit in as_text["results"]} == tagged
    as_object = search(server.url, filters={"tags": {"$contains": tag}}, **options)
    assert [hit["id"] for hit in as_object["results"]] == [hit["id"] for hit in as_text["results"]]
    in_sub = search(server.url, filters='folder = "sub"', **options)
    assert [hit["path"] for hit in in_sub["results"]] == [annotations[-1]["image"]]


def test_keyword_and_hybrid_modes_say_why(server, photos):
    _, annotations = photos
    word = annotations[2]["categories"][0].split()[-1]
    keyword = search(
        server.url, query=word, mode="keyword", top_k=200, include_images="none", collapse_duplicates=False
    )
    assert keyword["mode"] == "keyword" and keyword["results"]
    for hit in keyword["results"]:
        assert hit["why"]["keyword_rank"] == hit["rank"] and hit["why"]["matched_terms"]
        text = (hit["metadata"].get("description", "") + " " + " ".join(hit["metadata"]["tags"])).lower()
        assert word.lower()[:4] in text
    hybrid = search(server.url, query=word, mode="hybrid", top_k=5)
    assert len(hybrid["results"]) == 5
    assert all(
        set(hit["why"]) >= {"vector_rank", "keyword_rank", "matched_terms"} for hit in hybrid["results"]
    )
    assert any(hit["why"]["keyword_rank"] is not None for hit in hybrid["results"])
    vector = search(server.url, query=word, top_k=1)
    assert "why" not in vector["results"][0]


def test_offset_pages_add_up(server):
    options = {"query": "a kitchen", "collapse_duplicates": False, "include_images": "none"}
    whole = search(server.url, top_k=10, **options)["results"]
    first = search(server.url, top_k=5, **options)
    second = search(server.url, top_k=5, offset=5, **options)
    assert [hit["id"] for hit in first["results"] + second["results"]] == [hit["id"] for hit in whole]
    assert [hit["rank"] for hit in second["results"]] == [6, 7, 8, 9, 10] and second["offset"] == 5
    last = search(server.url, top_k=5, offset=PHOTOS - 2, **options)
    assert len(last["results"]) == 2 and last["has_more"] is False


def test_min_score_and_adaptive_cutoff(server):
    options = {"query": "people at the beach", "collapse_duplicates": False, "include_images": "none"}
    scores = [hit["score"] for hit in search(server.url, top_k=200, cutoff="none", **options)["results"]]
    assert len(scores) == PHOTOS
    between = (scores[6] + scores[7]) / 2
    above = search(server.url, top_k=200, min_score=between, **options)["results"]
    assert [hit["score"] for hit in above] == [score for score in scores if score >= between]
    threshold = scores[0] - 0.5 * (scores[0] - float(np.median(scores)))
    adaptive = search(server.url, top_k=200, cutoff="adaptive", **options)["results"]
    kept = [score for score in scores if score >= threshold - 1e-6]
    assert len(adaptive) == len(kept) < PHOTOS


def test_thumbnail_and_image_files_with_cache_headers(server, photos):
    dataset, annotations = photos
    ids = ids_by_path(server.url)
    image_id = ids[annotations[-1]["image"]]
    thumbnail = requests.get(f"{server.url}/thumbnails/{image_id}", timeout=10)
    assert thumbnail.status_code == 200 and thumbnail.headers["Content-Type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumbnail.content)).size) <= THUMBNAIL_SIZE
    assert "max-age" in thumbnail.headers["Cache-Control"]
    etag = thumbnail.headers["ETag"]
    again = requests.get(f"{server.url}/thumbnails/{image_id}", headers={"If-None-Match": etag}, timeout=10)
    assert again.status_code == 304 and again.content == b"" and again.headers["ETag"] == etag
    original = requests.get(f"{server.url}/images/{image_id}", timeout=10)
    assert (
        original.status_code == 200 and original.content == (dataset / annotations[-1]["image"]).read_bytes()
    )
    assert original.headers["Content-Type"] == "image/jpeg" and "max-age" in original.headers["Cache-Control"]
    cached = requests.get(
        f"{server.url}/images/{image_id}", headers={"If-None-Match": original.headers["ETag"]}, timeout=10
    )
    assert cached.status_code == 304 and cached.content == b""
    for path in ("/images/nope", "/thumbnails/nope", "/images/..%2F..%2Fetc%2Fpasswd", "/images/../api.py"):
        missing = requests.get(f"{server.url}{path}", timeout=10)
        assert missing.status_code == 404 and "error" in missing.json(), path


def test_openapi_document_describes_every_endpoint(openapi):
    validate_openapi(openapi)
    assert set(openapi["paths"]) == {
        "/",
        "/search",
        "/explain",
        "/thumbnails/{image_id}",
        "/images/{image_id}",
        "/index",
        "/openapi.json",
        "/ui",
        "/static/{filename}",
    }
    assert set(openapi["paths"]["/index"]) == {"get", "post"}
    top_k = openapi["components"]["schemas"]["SearchRequest"]["properties"]["top_k"]
    assert (top_k["type"], top_k["minimum"], top_k["maximum"]) == ("integer", 1, 200)
    for path in openapi["paths"].values():
        for operation in path.values():
            assert "500" in operation["responses"] and "429" in operation["responses"]


def test_web_page_and_static_files(server):
    page = requests.get(f"{server.url}/ui", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert page.content == (ROOT / "index.html").read_bytes()
    assert "<title>Image search</title>" in page.text and '<script src="static/app.js">' in page.text
    script = requests.get(f"{server.url}/static/app.js", timeout=10)
    assert script.status_code == 200 and script.content == (ROOT / "static" / "app.js").read_bytes()
    missing = requests.get(f"{server.url}/static/no-such-file.js", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()
    escape = requests.get(f"{server.url}/static/..%2Fconfig.py", timeout=10)
    assert escape.status_code == 404


# -- errors --------------------------------------------------------------------------------------


def test_search_errors_are_clear_json(server, photos):
    dataset, _ = photos
    too_long = "word " * 201
    cases = [
        (b"{not json", 400, "invalid JSON"),
        (b"", 400, "body is empty"),
        (b"[1, 2]", 400, "must be an object"),
        ({}, 400, "missing query"),
        ({"top_k": 5}, 400, "missing query"),
        ({"query": "dog", "top_k": "5"}, 400, "top_k must be an integer, not a string"),
        ({"query": "dog", "top_k": True}, 400, "top_k must be an integer, not a boolean"),
        ({"query": "dog", "top_k": 2.5}, 400, "top_k must be an integer"),
        ({"query": "dog", "top_k": 0}, 400, "top_k must be a whole number from 1 to 200"),
        ({"query": "dog", "top_k": 201}, 400, "top_k must be a whole number from 1 to 200"),
        ({"query": "dog", "offset": -1}, 400, "offset must be"),
        ({"query": "dog", "offset": False}, 400, "offset must be an integer"),
        ({"query": 42}, 400, "query must be a string"),
        ({"query": "   "}, 400, "empty"),
        ({"query": too_long}, 400, "longer than 1000 characters"),
        ({"query": "dog", "mode": "fuzzy"}, 400, "mode must be one of"),
        ({"query": "dog", "cutoff": "sometimes"}, 400, "cutoff must be one of"),
        ({"query": "dog", "min_score": "high"}, 400, "min_score must be a number"),
        ({"query": "dog", "min_score": 3}, 400, "min_score must be a number from -1 to 1"),
        ({"query": "dog", "collapse_duplicates": "yes"}, 400, "collapse_duplicates must be true or false"),
        ({"query": "dog", "include_images": "full"}, 400, "include_images must be one of"),
        ({"query": "dog", "filters": 7}, 400, "filters must be a string or an object"),
        ({"query": "dog", "filters": "width >>> 3"}, 400, "filter"),
        ({"query": "dog", "filters": {"width": {"$near": 3}}}, 400, "$near"),
        ({"query": "dog", "colour": "red"}, 400, "unknown field 'colour'"),
        ({"similar_to": "no-such-id"}, 404, "no indexed image has id 'no-such-id'"),
        ({"similar_to": "no-such-id", "mode": "keyword"}, 404, "no indexed image"),
        ({"image": "data:image/png;base64,%%%"}, 400, "not valid base64"),
        ({"image": base64.b64encode(b"hello, not an image").decode()}, 400, "not an image"),
        ({"image": 12}, 400, "image must be a data URI or base64 string"),
        ({"parts": "dog"}, 400, "parts must be a list"),
        ({"parts": [{"text": "dog", "id": "x"}]}, 400, "exactly one of text, image, id"),
        ({"parts": [{"text": "dog", "weight": "1"}]}, 400, "weight must be a number"),
        ({"parts": [{"text": "dog", "weight": 1e308}]}, 400, "weight must be a number from -10 to 10"),
        ({"parts": [{"text": "dog"}, {"text": "dog", "weight": -1}]}, 400, "cancel each other out"),
        ({"parts": [{"text": "dog"}] * 9}, 400, "at most 8 parts"),
        ({"query": "dog", "parts": [{"words": "x"}]}, 400, "unknown field 'words'"),
        ({"similar_to": "x", "mode": "keyword", "parts": [{"image": "%%"}]}, 400, "base64"),
    ]
    for body, status, fragment in cases:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = requests.post(
            f"{server.url}/search", data=data, headers={"Content-Type": "application/json"}, timeout=30
        )
        assert response.status_code == status, (body, response.text)
        assert response.headers["Content-Type"] == "application/json"
        assert fragment.lower() in response.json()["error"].lower(), (body, response.text)
        assert_no_leak(response.text, dataset)


@pytest.mark.parametrize("mode", ["keyword", "hybrid"])
def test_a_query_without_text_ranks_by_vector_in_any_mode(server, photos, openapi, mode):
    dataset, annotations = photos
    some_id = next(iter(ids_by_path(server.url).values()))
    by_vector = search(server.url, similar_to=some_id, top_k=5, include_images="none")
    asked = search(server.url, similar_to=some_id, top_k=5, include_images="none", mode=mode)
    assert by_vector["mode"] == "vector" and "note" not in by_vector
    assert asked["mode"] == "vector" and mode in asked["note"] and "vector" in asked["note"]
    assert [hit["id"] for hit in asked["results"]] == [hit["id"] for hit in by_vector["results"]]
    assert_matches_schema(openapi, "SearchResponse", asked)

    upload = {"image": ("query.jpg", (dataset / annotations[0]["image"]).read_bytes(), "image/jpeg")}
    response = requests.post(
        f"{server.url}/search", files=upload, data={"mode": mode, "include_images": "none"}, timeout=60
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["mode"] == "vector" and answer["note"] == asked["note"]
    assert answer["results"][0]["path"] == annotations[0]["image"]

    with_words = search(server.url, query="a photo", top_k=3, mode=mode, include_images="none")
    assert with_words["mode"] == mode and "note" not in with_words


def test_inline_previews_for_the_first_results(server):
    answer = search(server.url, query="a photo", top_k=10, include_images="none", previews=4)
    previews = [hit.get("preview") for hit in answer["results"]]
    assert all(uri.startswith("data:image/jpeg;base64,") for uri in previews[:4])
    assert previews[4:] == [None] * 6
    small = Image.open(io.BytesIO(base64.b64decode(previews[0].split(",", 1)[1])))
    assert max(small.size) <= 48 and len(previews[0]) < 2000
    inline = search(server.url, query="a photo", top_k=3, previews=3)["results"]
    assert all("preview" not in hit and hit["image"] for hit in inline)
    for bad in (-1, 25, "4", 1.5):
        refused = requests.post(f"{server.url}/search", json={"query": "a", "previews": bad}, timeout=30)
        assert refused.status_code == 400 and "previews" in refused.json()["error"]


def test_upload_errors(server, photos):
    dataset, _ = photos
    cases = [
        ({"image": ("notes.jpg", b"just some text", "image/jpeg")}, {}, 400, "not an image"),
        ({"image": ("huge.png", png_bytes((2000, 1500)), "image/png")}, {}, 400, "MAX_IMAGE_MEGAPIXELS"),
        ({"image": ("big.bin", os.urandom(int(1.2 * 1024 * 1024)), "image/jpeg")}, {}, 413, "MAX_UPLOAD_MB"),
        ({"image": ("ok.png", png_bytes((50, 50)), "image/png")}, {"top_k": "many"}, 400, "top_k must be"),
        ({"image": ("ok.png", png_bytes((50, 50)), "image/png")}, {"min_score": "nan"}, 400, "finite"),
        (
            {"image": ("ok.png", png_bytes((50, 50)), "image/png")},
            {"collapse_duplicates": "maybe"},
            400,
            "true",
        ),
        ({"picture": ("ok.png", png_bytes((50, 50)), "image/png")}, {}, 400, "unknown field 'picture'"),
        ({}, {"top_k": "3"}, 400, "missing query"),
        ({}, {"query": "", "top_k": "3"}, 400, "missing query"),
        ({}, {"query": "dog", "top_k": ""}, 400, "top_k must be a whole number, not ''"),
        ({}, [("query", "dog"), ("query", "cat")], 400, "'query' is given more than once"),
        ({}, {"query": "dog", "parts": "[{"}, 400, "parts must be JSON"),
    ]
    for files, form, status, fragment in cases:
        response = requests.post(f"{server.url}/search", files=files or None, data=form, timeout=60)
        assert response.status_code == status, (fragment, response.text)
        assert fragment.lower() in response.json()["error"].lower(), response.text
        assert_no_leak(response.text, dataset)
    as_text = requests.post(f"{server.url}/search", data="query=dog", headers={"Content-Type": "text/plain"})
    assert as_text.status_code == 400 and "JSON" in as_text.json()["error"]
    form_only = requests.post(f"{server.url}/search", data={"query": "a dog", "top_k": "2"}, timeout=30)
    assert form_only.status_code == 200 and len(form_only.json()["results"]) == 2


def test_unknown_routes_and_methods_answer_json(server):
    missing = requests.get(f"{server.url}/nothing/here", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"] == "not found: GET /nothing/here"
    wrong = requests.get(f"{server.url}/search", timeout=10)
    assert wrong.status_code == 405 and "allowed: POST" in wrong.json()["error"]
    assert "POST" in wrong.headers["Allow"]
    delete = requests.delete(f"{server.url}/index", timeout=10)
    assert delete.status_code == 405 and "GET, POST" in delete.json()["error"]
    bad_index = requests.post(f"{server.url}/index", json={"metadata": "nope"}, timeout=10)
    assert bad_index.status_code == 400 and "metadata must be a list" in bad_index.json()["error"]
    for body, fragment in (
        ({"metadata": [{"description": "no path"}]}, "metadata[0] needs a path"),
        ({"metadata": [{"path": "a.jpg", "size": {"w": 1}}]}, "metadata[0].size must be text"),
        (None, "must be an object"),
        ({"rebuild": True}, "unknown field 'rebuild'"),
    ):
        refused = requests.post(
            f"{server.url}/index",
            data=json.dumps(body),
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert refused.status_code == 400 and fragment in refused.json()["error"], refused.text
    bad_json = requests.post(
        f"{server.url}/index", data=b"{", headers={"Content-Type": "application/json"}, timeout=10
    )
    assert bad_json.status_code == 400 and "invalid JSON" in bad_json.json()["error"]


def test_internal_errors_hide_details(tiny_checkpoint, tmp_path, photos):
    from api import create_app
    from image_retrieval import ImageRetrieval

    settings = make_settings(tmp_path, photos[0], tiny_checkpoint)
    with ImageRetrieval(settings, role="api") as engine:
        app = create_app(settings, engine)
        app.add_url_rule("/explode", "explode", lambda: str(Path("/no/such/file").read_text()))
        response = app.test_client().get("/explode")
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal server error (details are in the server log)"}


def assert_no_leak(text: str, dataset: Path) -> None:
    assert "Traceback" not in text and str(dataset) not in text and str(ROOT) not in text


# -- CORS ----------------------------------------------------------------------------------------


def test_cors_answers_other_origins_only_with_the_token(server):
    bearer = {"Authorization": f"Bearer {server.token}"}
    for origin in ("null", "http://localhost:5173", "http://127.0.0.1:8080", "http://localhost"):
        refused = requests.post(
            f"{server.url}/search", json={"query": "dog", "top_k": 1}, headers={"Origin": origin}, timeout=30
        )
        assert refused.status_code == 401 and "results" not in refused.json(), origin
        response = requests.post(
            f"{server.url}/search",
            json={"query": "dog", "top_k": 1},
            headers={"Origin": origin, **bearer},
            timeout=30,
        )
        assert response.status_code == 200 and len(response.json()["results"]) == 1, origin
        assert response.headers.get("Access-Control-Allow-Origin") == origin, origin
        preflight = requests.options(
            f"{server.url}/search",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, authorization",
            },
            timeout=10,
        )
        assert preflight.status_code == 200
        assert preflight.headers.get("Access-Control-Allow-Origin") == origin
        assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
        assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    for origin in ("http://evil.example", "http://localhost.evil.example", "https://127.0.0.1.nip.io"):
        response = requests.post(
            f"{server.url}/search", json={"query": "dog", "top_k": 1}, headers={"Origin": origin}, timeout=30
        )
        assert response.status_code == 401 and "results" not in response.json(), origin


# -- token and rate limit ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory, tiny_checkpoint, photos):
    settings = make_settings(
        tmp_path_factory.mktemp("guarded"),
        photos[0],
        tiny_checkpoint,
        API_TOKEN="s3cret",
        RATE_LIMIT_PER_MINUTE=40,
    )
    with ApiServer(settings) as running:
        yield running


def test_token_is_required_except_for_health(guarded_server):
    url = guarded_server.url
    assert requests.get(f"{url}/", timeout=10).status_code == 200
    good = {"Authorization": "Bearer s3cret"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        for method, path in (
            ("post", "/search"),
            ("get", "/index"),
            ("post", "/index"),
            ("get", "/openapi.json"),
        ):
            response = requests.request(
                method, f"{url}{path}", json={"query": "dog"}, headers=headers, timeout=10
            )
            assert response.status_code == 401, (headers, path)
            assert "token" in response.json()["error"] and response.headers["WWW-Authenticate"] == "Bearer"
    missing = requests.get(f"{url}/thumbnails/nope", timeout=10)
    assert missing.status_code == 401
    preflight = requests.options(
        f"{url}/search",
        headers={
            "Origin": "null",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
        timeout=10,
    )
    assert preflight.status_code == 200 and preflight.headers["Access-Control-Allow-Origin"] == "null"
    allowed = requests.post(
        f"{url}/search", json={"query": "dog"}, headers={**good, "Origin": "null"}, timeout=30
    )
    assert allowed.status_code == 200 and allowed.json()["results"] == []
    assert allowed.headers["Access-Control-Allow-Origin"] == "null"
    document = requests.get(f"{url}/openapi.json", headers=good, timeout=10).json()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document["paths"]["/"]["get"]["security"] == []


def test_rate_limit_per_client(guarded_server):
    statuses = [requests.get(f"{guarded_server.url}/", timeout=10) for _ in range(41)]
    limited = [response for response in statuses if response.status_code == 429]
    assert limited and all(response.status_code == 200 for response in statuses[: -len(limited)])
    assert "at most 40 per minute" in limited[0].json()["error"]
    assert 0 < int(limited[0].headers["Retry-After"]) <= 60


# -- concurrency and other processes -------------------------------------------------------------


def test_embed_images_hands_its_job_to_the_server(tmp_path, tiny_checkpoint, coco_source):
    dataset = tmp_path / "dataset"
    copy_photos(coco_source, dataset, 0, 16)
    settings = make_settings(tmp_path, dataset, tiny_checkpoint, RATE_LIMIT_PER_MINUTE=0)
    with ApiServer(settings) as running:
        url = running.url
        assert index_and_wait(url)["state"] == "done"
        new = copy_photos(coco_source, dataset, 60, 12)
        metadata_file = tmp_path / "extra.json"
        metadata_file.write_text(
            json.dumps([{"path": new[0]["image"], "description": "zanzibar lighthouse"}])
        )
        load = SearchLoad(url, 4, 10, ["a cat", "a kitchen", "a bus"], keep_going=True)
        embed = subprocess.run(
            [sys.executable, str(ROOT / "embed_images.py"), "--quiet", "--metadata", str(metadata_file)],
            env={**os.environ, **settings_env(settings)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        load.stop()
        assert embed.returncode == 0, embed.stderr
        assert "owns the database: indexing through it" in embed.stderr
        assert embed.stdout.strip().startswith("added 12, ")
        assert load.errors == [] and load.completed >= 40
        assert requests.get(f"{url}/", timeout=10).json()["images"] == 28
        hit = search(url, image=data_uri(dataset / new[5]["image"]), top_k=1)["results"][0]
        assert hit["path"] == new[5]["image"]
        found = search(url, query="zanzibar", mode="keyword")["results"]
        assert [hit["path"] for hit in found] == [new[0]["image"]]
        (dataset / new[0]["image"]).unlink()
        gone = requests.get(f"{url}/images/{found[0]['id']}", timeout=10)
        assert gone.status_code == 404 and "error" in gone.json()


def test_a_restarted_server_reads_again_the_fields_recent_searches_filtered_on(
    tmp_path, tiny_checkpoint, coco_source
):
    dataset = tmp_path / "dataset"
    copy_photos(coco_source, dataset, 0, 8)
    settings = make_settings(tmp_path, dataset, tiny_checkpoint, RATE_LIMIT_PER_MINUTE=0)
    with ApiServer(settings) as running:
        assert index_and_wait(running.url)["state"] == "done"
        wide = search(running.url, query="a photo", filters="width >= 600", include_images="none")
        assert "read width" not in running.log()
    with ApiServer(settings) as restarted:
        deadline = time.monotonic() + 60
        while "read width, as recent searches did" not in restarted.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "read width, as recent searches did" in restarted.log()
        again = search(restarted.url, query="a photo", filters="width >= 600", include_images="none")
        assert [hit["id"] for hit in again["results"]] == [hit["id"] for hit in wide["results"]]
        assert 0 < len(again["results"]) < 8


def test_embed_images_waits_for_another_job_then_runs_its_own(
    tmp_path, tiny_checkpoint, coco_source, monkeypatch, capsys, caplog
):
    import embed_images

    dataset = tmp_path / "dataset"
    copy_photos(coco_source, dataset, 0, 80)
    settings = make_settings(tmp_path, dataset, tiny_checkpoint, RATE_LIMIT_PER_MINUTE=0)
    with ApiServer(settings) as running:
        url = running.url
        assert requests.post(f"{url}/index", json={}, timeout=30).status_code == 202
        new = copy_photos(coco_source, dataset, 80, 4)
        metadata_file = write_json(
            tmp_path / "extra.json", [{"path": new[0]["image"], "description": "zanzibar lighthouse"}]
        )
        for name, value in settings_env(settings).items():
            monkeypatch.setenv(name, value)
        caplog.set_level("INFO", logger="embed_images")
        assert embed_images.main(["--quiet", "--metadata", str(metadata_file)]) == 0
        assert "another indexing job is running on the server" in caplog.text
        summary, metadata_line = capsys.readouterr().out.splitlines()
        counts = {name: int(number) for name, number in re.findall(r"(added|unchanged) (\d+)", summary)}
        assert counts["added"] + counts["unchanged"] == 84 and counts["unchanged"] >= 80, summary
        assert metadata_line.startswith("metadata: 1 records, 1 matched"), metadata_line
        assert requests.get(f"{url}/", timeout=10).json()["images"] == 84
        found = search(url, query="zanzibar", mode="keyword")["results"]
        assert [hit["path"] for hit in found] == [new[0]["image"]]


def test_address_helpers():
    from api import cors_origin_patterns, is_loopback, local_url

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    assert local_url("0.0.0.0", 8000) == "http://127.0.0.1:8000" and local_url("::", 80) == "http://[::1]:80"
    patterns = cors_origin_patterns(["null", "http://localhost", "https://app.example:8443"])
    allowed = ("null", "http://localhost", "http://LOCALHOST:3000", "https://app.example:8443")
    refused = ("http://localhost.evil", "https://app.example", "https://app.example:9000", "nullx")
    assert all(any(pattern.match(origin) for pattern in patterns) for origin in allowed)
    assert not any(pattern.match(origin) for pattern in patterns for origin in refused)


def test_bad_settings_stop_the_server_with_a_message(tmp_path, tiny_checkpoint, photos):
    """The helper passes every setting; a bad one stops the server with a message, not a traceback."""
    settings = make_settings(tmp_path, photos[0], tiny_checkpoint)
    assert settings_env(settings)["THUMBNAIL_SIZE"] == str(Settings.THUMBNAIL_SIZE)
    result = subprocess.run(
        [sys.executable, str(ROOT / "api.py")],
        env={**os.environ, **settings_env(settings), "MODEL_NAME": str(tmp_path / "missing.pt")},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "unknown model" in result.stderr and "Traceback" not in result.stderr


def test_the_server_bounds_how_long_idle_openmp_threads_spin_unless_the_user_chose():
    """A text query's encoder threads would otherwise spin on the cores its product-code scan needs."""
    from api import OPENMP_SPIN_COUNT, bound_openmp_spinning

    unset: dict[str, str] = {}
    bound_openmp_spinning(unset)
    assert unset == {"GOMP_SPINCOUNT": OPENMP_SPIN_COUNT}
    for chosen in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "5"}):
        kept = dict(chosen)
        bound_openmp_spinning(kept)
        assert kept == chosen
