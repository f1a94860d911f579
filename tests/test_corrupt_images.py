"""Issue 8: hostile image files at indexing and at upload, and path safety of every id-taking request."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from api_server import ApiServer, settings_env
from conftest import make_settings
from corrupt_corpus import SECRET_TEXT, CorpusFile, exif6_upright, write_corrupt_corpus
from in_process import run_script
from PIL import Image

from image_retrieval import ImageRetrieval
from indexer import image_id

ROOT = Path(__file__).resolve().parents[1]
# What an upload of each skipped file's bytes must be refused for (links point to valid pictures).
UPLOAD_REFUSALS = {
    "truncated.jpg": "corrupt or truncated",
    "zero bytes.jpg": "empty",
    "random.jpg": "not an image",
    "text.png": "not an image",
    "bomb.png": "too large",
    **dict.fromkeys(("icon.png", "pixmap.jpg", "sgi.png", "j2k.jpg"), "unrecognised format"),
}


def run_embed(settings) -> subprocess.CompletedProcess:
    return run_script("embed_images.py", ["--quiet"], settings_env(settings))


def failed_count(stdout: str) -> int:
    return int(re.search(r"failed (\d+)", stdout).group(1))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_checkpoint):
    base = tmp_path_factory.mktemp("corrupt")
    files = write_corrupt_corpus(base / "dataset", base / "outside")
    settings = make_settings(base, base / "dataset", tiny_checkpoint, RATE_LIMIT_PER_MINUTE=0)
    first = run_embed(settings)
    return settings, files, first, base


@pytest.fixture(scope="module")
def server(corpus):
    settings, _, first, _ = corpus
    assert first.returncode == 0, first.stderr
    with ApiServer(settings) as running:
        yield running


def test_indexing_keeps_or_skips_each_file_with_its_reason(corpus, encoder):
    settings, files, first, _ = corpus
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    skipped = [item for item in files if not item.indexed]
    for item in skipped:
        assert re.search(rf"skipped {re.escape(item.name)}: .*{item.reason}", first.stderr), item.name
    assert failed_count(first.stdout) == len(skipped)
    with ImageRetrieval(settings) as engine:
        stored = {metadata["path"]: image_id_ for image_id_, metadata in engine.store.items()}
        assert sorted(stored) == sorted(item.name for item in files if item.indexed)
        for item in files:
            if item.indexed:
                assert_indexed_correctly(engine, stored[item.name], item, encoder)
    again = run_embed(settings)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"added 0, updated 0, moved 0, removed 0, unchanged {len(stored)}")
    assert failed_count(again.stdout) == len(skipped)


def assert_indexed_correctly(engine: ImageRetrieval, stored_id: str, item: CorpusFile, encoder) -> None:
    metadata = engine.store.metadata(stored_id)
    assert (metadata["width"], metadata["height"]) == item.size, item.name
    path = engine.dataset_root / item.name
    reference = encoder.encode_images([item.reference(path)])[0]
    stored = engine.store.vector(stored_id)
    assert float(stored @ reference) >= 0.999, item.name
    if item.reference is exif6_upright:
        with Image.open(path) as sideways:
            unrotated = encoder.encode_images([sideways.convert("RGB")])[0]
        assert float(stored @ reference) > float(stored @ unrotated) + 1e-4


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_uploading_each_file_answers_or_refuses_with_a_reason(server, corpus):
    _, files, _, base = corpus
    for item in files:
        if not item.readable:
            continue
        data = (base / "dataset" / item.name).read_bytes()
        multipart = requests.post(
            f"{server.url}/search",
            files={"image": (Path(item.name).name, data)},
            data={"collapse_duplicates": "false", "include_images": "none"},
            timeout=120,
        )
        as_json = requests.post(
            f"{server.url}/search",
            json={"image": data_uri(data), "collapse_duplicates": False, "include_images": "none"},
            timeout=120,
        )
        for response in (multipart, as_json):
            refusal = UPLOAD_REFUSALS.get(item.name)
            if refusal:
                assert response.status_code == 400, (item.name, response.text)
                assert refusal in response.json()["error"], (item.name, response.text)
            else:
                assert response.status_code == 200, (item.name, response.text)
                assert_found_itself(response.json()["results"], item)


def assert_found_itself(results: list[dict], item: CorpusFile) -> None:
    """An indexed file finds itself first; a picture behind a skipped link is not in the index."""
    best = results[0]["score"]
    found = {hit["id"] for hit in results if hit["score"] >= best - 1e-4}
    if item.indexed:
        assert best >= 0.999 and image_id(item.name) in found, item.name
    else:
        assert best < 0.999 and image_id(item.name) not in found, item.name


# -- path safety ---------------------------------------------------------------------------------


def raw_get(port: int, path: str) -> tuple[int, bytes, str]:
    """GET with the path sent byte for byte as given (no client-side normalisation of `..` or %).

    A redirect that merely merges slashes within the same route is followed.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        status, body, content_type = response.status, response.read(), response.getheader("Content-Type", "")
        location = response.getheader("Location", "")
    finally:
        connection.close()
    route = "/" + path.split("/")[1] + "/"
    target = urlsplit(location)
    if status in (301, 308) and target.path.startswith(route) and target.netloc in ("", f"127.0.0.1:{port}"):
        return raw_get(port, target.path)
    return status, body, content_type


def hostile_ids(dataset: Path, outside: Path) -> list[str]:
    absolute = str(outside / "secret.txt")
    return [
        "..",
        "../../../../etc/passwd",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "%252e%252e%252fetc%252fpasswd",
        "..%252F..%252Fetc%252Fpasswd",
        "%2Fetc%2Fpasswd",
        "/etc/passwd",
        absolute,
        absolute.replace("/", "%2F"),
        "..\\..\\etc\\passwd",
        "plain.jpg",
        "outside.jpg",
        "outside%20folder%2Fsecret.txt",
        image_id("outside.jpg"),
        image_id("outside folder/secret.jpg"),
        image_id("loop a.jpg"),
        image_id("../outside/secret.jpg"),
        "%00",
        "plain.jpg%00.png",
        str(dataset / "plain.jpg").replace("/", "%2F"),
    ]


def test_no_request_reads_a_file_that_is_not_an_indexed_image(server, corpus):
    _, files, _, base = corpus
    dataset, outside = base / "dataset", base / "outside"
    secret_bytes = (outside / "secret.jpg").read_bytes()
    for hostile in hostile_ids(dataset, outside):
        for route in ("/images/", "/thumbnails/", "/static/", "/images/x/", "/static/../"):
            status, body, content_type = raw_get(server.port, route + hostile)
            assert status in (400, 404), (route, hostile, status)
            assert content_type.startswith("application/json") and json.loads(body)["error"]
            assert SECRET_TEXT.encode() not in body and secret_bytes not in body
        decoded = requests.utils.unquote(hostile)
        for body in ({"similar_to": decoded}, {"parts": [{"id": decoded}]}):
            response = requests.post(f"{server.url}/search", json=body, timeout=60)
            assert response.status_code == 404, (body, response.text)
            assert "no indexed image" in response.json()["error"]
    for item in files:
        if item.indexed:
            status, body, _ = raw_get(server.port, f"/images/{image_id(item.name)}")
            assert status == 200 and body == (dataset / item.name).read_bytes(), item.name


def test_files_changed_after_indexing_are_not_served(server, corpus):
    """Deleted, swapped for a symlink to a secret, or for a symlink loop: 404, never the new target."""
    _, _, _, base = corpus
    dataset, outside = base / "dataset", base / "outside"
    secret_bytes = (outside / "secret.jpg").read_bytes()
    shutil.copy(dataset / "plain.jpg", base / "plain backup.jpg")
    (dataset / "plain.jpg").unlink()
    (dataset / "cmyk.jpg").unlink()
    os.symlink(outside / "secret.jpg", dataset / "cmyk.jpg")
    (dataset / "gray16.png").unlink()
    os.symlink("gray16.png", dataset / "gray16.png")
    try:
        for name in ("plain.jpg", "cmyk.jpg", "gray16.png"):
            for route in ("/images/", "/thumbnails/"):
                status, body, content_type = raw_get(server.port, route + image_id(name))
                assert status == 404, (route, name, status)
                assert content_type.startswith("application/json") and secret_bytes not in body
    finally:
        for name in ("plain.jpg", "cmyk.jpg", "gray16.png"):
            (dataset / name).unlink(missing_ok=True)
        shutil.copy(base / "plain backup.jpg", dataset / "plain.jpg")
