"""Issue 8: faults (kill -9, broken databases, a Chroma server going away), load, and security defaults."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import in_process
import numpy as np
import pytest
import requests
from api_server import ApiServer, free_port, settings_env
from conftest import make_settings, server_settings
from data_factory import write_tiny_checkpoint

from image_retrieval import ImageRetrieval

ROOT = Path(__file__).resolve().parents[1]
KILL_RUNS = 4
CLIENTS, SEARCHES_PER_CLIENT = 8, 200


# -- helpers -------------------------------------------------------------------------------------


def copy_photos(coco_source, dest: Path, start: int, count: int) -> list[dict]:
    folder, annotations = coco_source
    dest.mkdir(parents=True, exist_ok=True)
    for annotation in annotations[start : start + count]:
        shutil.copy(folder / annotation["image"], dest / annotation["image"])
    return annotations[start : start + count]


def run_script(
    script: str, settings, *args: str, timeout: float = 300, own_process: bool = False, **env: str
) -> subprocess.CompletedProcess:
    return in_process.run_script(script, list(args), {**settings_env(settings), **env}, own_process, timeout)


def assert_clear_failure(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert "error:" in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


def data_uri(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def wait_for_index(url: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{url}/index", timeout=30).json()
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError("indexing did not finish")


# -- kill -9 -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_during_indexing_loses_nothing(tmp_path, tiny_checkpoint, coco_source):
    dataset = tmp_path / "dataset"
    annotations = copy_photos(coco_source, dataset, 0, 48)
    records = [
        {"path": item["image"], "description": item["captions"][0], "tags": item["categories"]}
        for item in annotations
    ]
    (dataset / "metadata.json").write_text(json.dumps(records))
    settings = make_settings(tmp_path, dataset, tiny_checkpoint, BATCH_SIZE=4)
    rng = random.Random(8)
    for _ in range(KILL_RUNS):
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "embed_images.py"), "--quiet"],
            env={**os.environ, **settings_env(settings)},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(2.0, 9.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
    final = run_script("embed_images.py", settings, "--quiet")
    assert final.returncode == 0, final.stderr
    with ImageRetrieval(settings) as engine:
        stored = [metadata for _, metadata in engine.store.items()]
        stored_ids = engine.store.view().collection.get(include=[])["ids"]
        assert engine.store.stored_count() == len(stored) == len(set(stored_ids))  # no image twice
        assert sorted(metadata["path"] for metadata in stored) == sorted(
            item["image"] for item in annotations
        )
        by_path = {record["path"]: record for record in records}
        for metadata in stored:
            assert metadata["description"] == by_path[metadata["path"]]["description"]
            assert list(metadata["tags"]) == by_path[metadata["path"]]["tags"]
        for item in annotations[::12]:
            hit = engine.search_image(dataset / item["image"], top_k=1).hits[0]
            assert hit.path == item["image"] and hit.score >= 0.999
        caption_word = records[0]["description"].split()[-1]
        assert engine.search_text(caption_word, mode="keyword").hits
    again = run_script("embed_images.py", settings, "--quiet")
    assert again.stdout.startswith("added 0, updated 0, moved 0, removed 0, unchanged 48"), again.stdout


# -- broken databases ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, tiny_checkpoint, coco_source):
    base = tmp_path_factory.mktemp("small")
    copy_photos(coco_source, base / "dataset", 0, 6)
    settings = make_settings(base, base / "dataset", tiny_checkpoint)
    first = run_script("embed_images.py", settings, "--quiet")
    assert first.returncode == 0, first.stderr
    return base, settings


def test_missing_database_folder(small_index):
    base, settings = small_index
    missing = settings.with_overrides(CHROMA_DB_PATH=str(base / "nowhere" / "db"))
    assert_clear_failure(run_script("main.py", missing, "a dog"), "no index at", "embed_images.py")
    assert not (base / "nowhere").exists()
    with ApiServer(missing, log_path=base / "api-missing.log") as server:
        health = requests.get(f"{server.url}/", timeout=10).json()
        assert health["images"] == 0
        assert (
            requests.post(f"{server.url}/search", json={"query": "a dog"}, timeout=60).json()["results"] == []
        )


@pytest.mark.parametrize("kind", ["regular file", "corrupt sqlite", "another model"])
def test_unusable_database_gives_a_clear_message(small_index, tmp_path, kind):
    _base, settings = small_index
    if kind == "regular file":
        path = tmp_path / "db-is-a-file"
        path.write_text("not a folder")
        broken, phrases = settings.with_overrides(CHROMA_DB_PATH=str(path)), ["db-is-a-file"]
    elif kind == "corrupt sqlite":
        path = tmp_path / "corrupt-db"
        path.mkdir()
        (path / "chroma.sqlite3").write_bytes(random.Random(1).randbytes(20000))
        broken, phrases = settings.with_overrides(CHROMA_DB_PATH=str(path)), ["cannot open the database"]
    else:
        other = write_tiny_checkpoint(tmp_path / "other-model.pt", seed=1)
        broken, phrases = (
            settings.with_overrides(MODEL_NAME=str(other)),
            ["was built with model", "--rebuild"],
        )
    for script, args in (("embed_images.py", ["--quiet"]), ("main.py", ["a dog"]), ("api.py", [])):
        result = run_script(script, broken, *args, own_process=True, API_PORT=str(free_port()))
        assert_clear_failure(result, *phrases)


# -- a Chroma server going away ------------------------------------------------------------------


def test_chroma_server_outage_is_503_then_heals(tmp_path, tiny_checkpoint, coco_source, chroma_server):
    dataset = tmp_path / "dataset"
    copy_photos(coco_source, dataset, 0, 8)
    settings = server_settings(tmp_path, dataset, tiny_checkpoint, chroma_server)
    indexed = run_script("embed_images.py", settings, "--quiet")
    assert indexed.returncode == 0, indexed.stderr
    example = data_uri(next(dataset.glob("*.jpg")))
    queries = [{"query": "a dog"}, {"image": example}, {"query": "a dog", "mode": "hybrid"}]
    with ApiServer(settings) as server:
        for body in queries:
            assert requests.post(f"{server.url}/search", json=body, timeout=60).status_code == 200
        chroma_server.stop()
        time.sleep(1.1)
        for body in [*queries, {"query": "a cat"}]:
            down = requests.post(f"{server.url}/search", json=body, timeout=60)
            assert down.status_code == 503, down.text
            assert "not answering" in down.json()["error"] and down.headers["Retry-After"]
            assert settings.CHROMA_DB_PATH not in down.text
        health = requests.get(f"{server.url}/", timeout=30)  # issue 19: not "ok" while Chroma is down
        assert health.status_code == 503 and "Chroma server" in health.json()["error"], health.text
        offline_embed = run_script("embed_images.py", settings, "--quiet", timeout=120)
        assert_clear_failure(offline_embed, "Chroma server")
        chroma_server.start()
        time.sleep(1.1)
        for body in queries:
            back = requests.post(f"{server.url}/search", json=body, timeout=60)
            assert back.status_code == 200 and len(back.json()["results"]) == 5, back.text
        assert requests.get(f"{server.url}/", timeout=10).json()["images"] == 8


# -- load ----------------------------------------------------------------------------------------


class Clients:
    """`count` threads, each sending `searches` mixed searches, recording latencies and errors."""

    def __init__(self, url: str, count: int, searches: int, bodies: list[dict]) -> None:
        self.url, self.bodies = url, bodies
        self.latencies: list[float] = []
        self.spans: list[tuple[float, float]] = []  # (sent, answered) of each search, time.monotonic()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(index, searches)) for index in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self, index: int, searches: int) -> None:
        session = requests.Session()
        for number in range(searches):
            body = self.bodies[(index + number) % len(self.bodies)]
            started = time.monotonic()
            try:
                response = session.post(f"{self.url}/search", json=body, timeout=120)
                error = None if response.status_code == 200 else f"{response.status_code}: {response.text}"
            except requests.RequestException as exception:
                error = str(exception)
            answered = time.monotonic()
            with self._lock:
                self.latencies.append(answered - started)
                self.spans.append((started, answered))
                if error:
                    self.errors.append(error)

    def join(self) -> None:
        for thread in self.threads:
            thread.join()


def watch_index(url: str, timeout: float = 600) -> list[tuple[float, float, dict]]:
    """GET /index until the job ends: (sent, answered, status) of every poll, time.monotonic()."""
    polls = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sent = time.monotonic()
        job = requests.get(f"{url}/index", timeout=30).json()
        polls.append((sent, time.monotonic(), job))
        if job["state"] in ("done", "failed"):
            return polls
        time.sleep(0.1)
    raise AssertionError("indexing did not finish")


def searches_inside_the_job(polls: list[tuple[float, float, dict]], spans: list[tuple[float, float]]) -> int:
    """Searches sent and answered while the job was surely running.

    A job runs once and never returns to "running", so it ran all the time from the answer of the first
    poll that saw it running to the sending of the last one that did.
    """
    running = [(sent, answered) for sent, answered, job in polls if job["state"] == "running"]
    if len(running) < 2:
        return 0
    begin, end = running[0][1], running[-1][0]
    return sum(1 for sent, answered in spans if begin <= sent and answered <= end)


def test_concurrent_clients_while_indexing(tmp_path, tiny_checkpoint, coco_source):
    dataset = tmp_path / "dataset"
    copy_photos(coco_source, dataset, 0, 20)
    settings = make_settings(tmp_path, dataset, tiny_checkpoint, BATCH_SIZE=2, RATE_LIMIT_PER_MINUTE=0)
    with ApiServer(settings) as server:
        requests.post(f"{server.url}/index", timeout=30)
        assert wait_for_index(server.url)["state"] == "done"
        some_id = requests.post(f"{server.url}/search", json={"query": "a"}, timeout=60).json()["results"][0][
            "id"
        ]
        new = copy_photos(coco_source, dataset, 20, 60)
        example = data_uri(dataset / new[0]["image"])
        bodies = [
            {"query": "a dog on a sofa", "include_images": "none"},
            {"query": "a street", "mode": "hybrid"},
            {"query": "pizza", "mode": "keyword"},
            {"similar_to": some_id, "top_k": 10},
            {"image": example, "include_images": "none"},
            {"query": "people", "filters": "width >= 100", "offset": 5},
        ]
        started = requests.post(f"{server.url}/index", timeout=30)
        assert started.status_code == 202 and started.json()["state"] == "running"
        clients = Clients(server.url, CLIENTS, SEARCHES_PER_CLIENT, bodies)
        again = requests.post(f"{server.url}/index", timeout=30)
        assert again.status_code == 409 and "already running" in again.json()["error"]
        polls = watch_index(server.url)
        clients.join()
        job = polls[-1][2]
        assert requests.get(f"{server.url}/", timeout=10).json()["images"] == 80
        for item in new[1:4]:
            body = {"image": data_uri(dataset / item["image"]), "top_k": 1}
            hit = requests.post(f"{server.url}/search", json=body, timeout=60).json()["results"][0]
            assert hit["path"] == item["image"] and hit["score"] >= 0.999
    assert clients.errors == []
    assert len(clients.latencies) == CLIENTS * SEARCHES_PER_CLIENT
    assert job["state"] == "done" and job["summary"]["added"] == 60, job
    overlapping = searches_inside_the_job(polls, clients.spans)
    assert overlapping >= CLIENTS, f"only {overlapping} searches ran while the indexing job ran"
    p50, p95 = np.percentile(clients.latencies, [50, 95])
    overlapped = f"{overlapping} of them while indexing ran"
    print(
        f"\n{CLIENTS} clients x {SEARCHES_PER_CLIENT} searches: p50 {p50 * 1000:.0f} ms, "
        f"p95 {p95 * 1000:.0f} ms, 0 errors ({overlapped})"
    )


# -- security defaults ---------------------------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as in /proc/net/tcp) of sockets listening on `port`."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                addresses.add(address)
    return addresses


def test_binds_to_loopback_by_default(small_index, tmp_path):
    _base, settings = small_index
    port = free_port()
    env = {**os.environ, **settings_env(settings), "API_PORT": str(port)}
    del env["API_HOST"]
    log_file = open(tmp_path / "api.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "api.py")], env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 180
        while not listening_addresses(port) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only
    finally:
        process.terminate()
        process.wait(timeout=30)
        log_file.close()


def test_open_binding_without_token_warns(small_index, tmp_path):
    _, settings = small_index
    open_settings = settings.with_overrides(API_HOST="0.0.0.0")
    server = ApiServer(open_settings, log_path=tmp_path / "open.log")
    server.settings = open_settings.with_overrides(API_PORT=server.port)
    with server:
        assert "without API_TOKEN" in server.log()


@pytest.fixture(scope="module")
def guarded(small_index):
    base, settings = small_index
    guarded_settings = settings.with_overrides(
        API_TOKEN="t0ken-d3f4ult", MAX_UPLOAD_MB=0.05, RATE_LIMIT_PER_MINUTE=30
    )
    with ApiServer(guarded_settings, log_path=base / "guarded.log") as server:
        yield server


def test_token_upload_size_and_rate_are_bounded(guarded):
    url, good = guarded.url, {"Authorization": "Bearer t0ken-d3f4ult"}
    assert requests.post(f"{url}/search", json={"query": "a dog"}, timeout=60).status_code == 401
    assert (
        requests.post(f"{url}/search", json={"query": "a dog"}, headers=good, timeout=60).status_code == 200
    )
    big = os.urandom(80 * 1024)
    uploads = [
        requests.post(f"{url}/search", files={"image": ("big.jpg", big)}, headers=good, timeout=60),
        requests.post(
            f"{url}/search", json={"image": base64.b64encode(big).decode()}, headers=good, timeout=60
        ),
        requests.post(
            f"{url}/search",
            data=iter([big[:40000], big[40000:]]),  # chunked: no Content-Length to check up front
            headers={**good, "Content-Type": "application/json"},
            timeout=60,
        ),
    ]
    for response in uploads:
        assert response.status_code == 413, response.text
        assert "MAX_UPLOAD_MB=0.05" in response.json()["error"]
    statuses = [requests.get(f"{url}/index", headers=good, timeout=10) for _ in range(30)]
    limited = [response for response in statuses if response.status_code == 429]
    assert limited, "the rate limit never applied"
    assert "at most 30 per minute" in limited[0].json()["error"] and limited[0].headers["Retry-After"]
    for response in (*uploads, *limited):
        assert "t0ken-d3f4ult" not in response.text and "/tmp/" not in response.text
