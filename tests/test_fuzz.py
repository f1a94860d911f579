"""Issue 8: property-based fuzzing of every endpoint with schemathesis, from the server's /openapi.json.

Each endpoint gets schema-valid and schema-violating requests (schemathesis' positive and negative
modes), with a random extra query string and a random choice of token (right, wrong or none). Every
response must be below 500, every error a JSON object with an "error" text, and no response body may
contain the token or an absolute path of the server (dataset folder, database, code).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from pathlib import Path

import hypothesis
import pytest
import requests
import schemathesis
from api_server import ApiServer
from conftest import make_settings
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "fuzz-token-5b9e2c7d41"
PHOTOS = 6
# Requests per endpoint and generation mode: 2 x 500 = 1,000 per endpoint (about 3 minutes on 2 cores).
EXAMPLES_PER_MODE = 500
ENDPOINTS = {
    "GET /",
    "POST /search",
    "POST /explain",
    "GET /thumbnails/{image_id}",
    "GET /images/{image_id}",
    "GET /index",
    "POST /index",
    "GET /openapi.json",
    "GET /ui",
    "GET /static/{filename}",
}
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_checkpoint, coco_source):
    base = tmp_path_factory.mktemp("fuzz")
    folder, annotations = coco_source
    dataset = base / "dataset"
    dataset.mkdir()
    for annotation in annotations[:PHOTOS]:
        shutil.copy(folder / annotation["image"], dataset / annotation["image"])
    settings = make_settings(
        base,
        dataset,
        tiny_checkpoint,
        API_TOKEN=TOKEN,
        RATE_LIMIT_PER_MINUTE=0,
        MAX_UPLOAD_MB=1.0,
        THUMBNAIL_SIZE=32,
        LOG_LEVEL="ERROR",
    )
    with ApiServer(settings, log_path=base / "api.log") as running:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        assert requests.post(f"{running.url}/index", headers=headers, timeout=30).status_code == 202
        wait_until_idle(running.url, headers)
        yield running, settings, base


def wait_until_idle(url: str, headers: dict[str, str]) -> dict:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = requests.get(f"{url}/index", headers=headers, timeout=30).json()
        if job["state"] != "running":
            return job
        time.sleep(0.1)
    raise AssertionError("indexing did not finish")


def forbidden_texts(settings, base: Path) -> list[bytes]:
    """What must never appear in a response: the token and the server's absolute paths."""
    paths = {
        str(Path(settings.DATASET_FOLDER).resolve()),
        str(Path(settings.CHROMA_DB_PATH).resolve()),
        str(base.resolve()),
        str(ROOT),
        str(Path(settings.MODEL_NAME).resolve().parent),
    }
    return [TOKEN.encode(), b"Traceback", *(path.encode() for path in paths)]


def check_response(response: schemathesis.Response, forbidden: list[bytes], label: str) -> None:
    assert response.status_code < 500, (label, response.status_code, response.text[:500])
    if response.status_code >= 400:
        content_type = response.headers.get("content-type", [""])[0]
        assert content_type.startswith("application/json"), (label, response.status_code, response.text[:200])
        error = response.json()["error"]
        assert isinstance(error, str) and error.strip(), (label, response.text[:200])
    for text in forbidden:
        assert text not in response.content, (label, text, response.content[:300])


AUTH_CHOICES = st.sampled_from(["right"] * 6 + ["wrong", "none"])
# Sometimes a path parameter is replaced by one that exists, so that the success paths are fuzzed too.
KNOWN_FILES = ["app.js", "style.css"]
EXTRA_QUERY = st.dictionaries(
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=8),
    st.text(max_size=20),
    max_size=2,
)


def fuzz_operation(
    operation, mode: GenerationMode, examples: int, seed: int, server: dict, forbidden: list[bytes]
) -> Counter:
    """Send `examples` generated requests to one operation (seeded); returns their status codes."""
    statuses: Counter = Counter()
    session = requests.Session()

    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.seed(seed)
    @hypothesis.given(
        case=operation.as_strategy(generation_mode=mode),
        auth=AUTH_CHOICES,
        extra=EXTRA_QUERY,
        known=st.none() | st.sampled_from(server["ids"]),
        known_file=st.none() | st.sampled_from(KNOWN_FILES),
    )
    def send(case, auth: str, extra: dict[str, str], known: str | None, known_file: str | None) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}" if auth == "right" else "Bearer nope"}
        if auth == "none":
            headers = {}
        case.query = {**extra, **(case.query or {})}
        replace_path_parameter(case, "image_id", known)
        replace_path_parameter(case, "filename", known_file)
        response = case.call(base_url=server["url"], session=session, headers=headers, timeout=120)
        statuses[response.status_code] += 1
        check_response(response, forbidden, f"{operation.label} {mode.value}: {case.as_curl_command()}")

    send()
    return statuses


def replace_path_parameter(case, name: str, value: str | None) -> None:
    if value is not None and name in (case.path_parameters or {}):
        case.path_parameters = {**case.path_parameters, name: value}


def indexed_ids(url: str) -> list[str]:
    body = {"query": "a photo", "top_k": PHOTOS, "collapse_duplicates": False, "include_images": "none"}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    found = requests.post(f"{url}/search", json=body, headers=headers, timeout=60)
    return [hit["id"] for hit in found.json()["results"]]


@pytest.mark.slow
def test_fuzz_every_endpoint(fuzz_server):
    server, settings, base = fuzz_server
    forbidden = forbidden_texts(settings, base)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    served = requests.get(f"{server.url}/openapi.json", headers=auth, timeout=30)
    schema = schemathesis.openapi.from_dict(served.json())  # from_url would leave out /openapi.json itself
    target = {"url": server.url, "ids": indexed_ids(server.url)}
    assert len(target["ids"]) == PHOTOS
    sent: dict[str, Counter] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        per_mode = EXAMPLES_PER_MODE
        started = time.monotonic()
        sent[operation.label] = Counter()
        for seed, mode in enumerate(GenerationMode):
            try:
                statuses = fuzz_operation(operation, mode, per_mode, seed, target, forbidden)
            except Unsatisfiable:  # nothing to violate (no parameters): more valid requests instead
                positive = GenerationMode.POSITIVE
                statuses = fuzz_operation(operation, positive, per_mode, 99, target, forbidden)
            sent[operation.label] += statuses
        log.warning(
            "fuzzed %s: %d requests in %.0f s, statuses %s",
            operation.label,
            sum(sent[operation.label].values()),
            time.monotonic() - started,
            dict(sent[operation.label]),
        )
    print({label: sum(statuses.values()) for label, statuses in sent.items()})
    assert set(sent) == ENDPOINTS
    assert all(sum(statuses.values()) >= 1000 for statuses in sent.values())
    assert sent["GET /images/{image_id}"][200] > 0 and sent["GET /thumbnails/{image_id}"][200] > 0
    assert sent["POST /search"][200] > 0 and sent["POST /search"][400] > 0
    headers = {"Authorization": f"Bearer {TOKEN}"}
    wait_until_idle(server.url, headers)
    health = requests.get(f"{server.url}/", timeout=10).json()
    assert health["status"] == "ok" and health["images"] == PHOTOS
    found = requests.post(f"{server.url}/search", json={"query": "a photo"}, headers=headers, timeout=60)
    assert found.status_code == 200 and len(found.json()["results"]) == 5
