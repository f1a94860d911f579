"""Past one machine (issue 16): two API processes and one indexer against one Chroma server.

Each process stands for another host: its own mirror (the first API owns the mirror folder, the
second keeps a private one), its own view of the collection. Under a steady search load on both APIs,
while the indexer writes batch after batch, every search must succeed and each API must see every
batch within a bounded time of Chroma holding it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import chromadb
import requests
from api_server import ApiServer, settings_env
from conftest import server_settings
from test_faults import copy_photos, data_uri, run_script

ROOT = Path(__file__).resolve().parents[1]
FIRST, ADDED = 8, 60
# Staleness is checked once a second (store.STALE_CHECK_SECONDS), then the mirror is rebuilt.
VISIBLE_WITHIN_SECONDS = 15.0


class Observer(threading.Thread):
    """Polls a count every 0.1 s until stopped: [(time.monotonic(), count)]."""

    def __init__(self, count: Callable[[], int]) -> None:
        super().__init__(daemon=True)
        self.count, self.seen, self.errors = count, [], []
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.seen.append((time.monotonic(), self.count()))
            except Exception as error:  # every failure is a finding of the test
                self.errors.append(repr(error))
            time.sleep(0.1)


class Searcher(threading.Thread):
    """Mixed searches on one API, back to back, until stopped."""

    def __init__(self, url: str, bodies: list[dict]) -> None:
        super().__init__(daemon=True)
        self.url, self.bodies = url, bodies
        self.answered, self.errors = 0, []
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            body = self.bodies[self.answered % len(self.bodies)]
            try:
                response = session.post(f"{self.url}/search", json=body, timeout=120)
                if response.status_code != 200:
                    self.errors.append(f"{response.status_code}: {response.text[:200]}")
            except requests.RequestException as error:
                self.errors.append(str(error))
            self.answered += 1


def api_count(url: str) -> Callable[[], int]:
    return lambda: requests.get(f"{url}/", timeout=30).json()["images"]


def first_seen(seen: list[tuple[float, int]], count: int) -> float | None:
    return next((moment for moment, seen_count in seen if seen_count >= count), None)


def test_two_apis_and_an_indexer_on_one_chroma_server_stay_consistent_under_load(
    tmp_path, tiny_checkpoint, coco_source, chroma_server
):
    dataset = tmp_path / "dataset"
    copy_photos(coco_source, dataset, 0, FIRST)
    settings = server_settings(tmp_path, dataset, tiny_checkpoint, chroma_server, BATCH_SIZE=2)
    assert run_script("embed_images.py", settings, "--quiet").returncode == 0
    chroma = chromadb.HttpClient(host=chroma_server.host, port=chroma_server.port)
    collection = chroma.get_collection(settings.COLLECTION_NAME)
    with ApiServer(settings) as first, ApiServer(settings) as second:
        bodies = [
            {"query": "a dog on a sofa", "include_images": "none"},
            {"query": "a street", "mode": "hybrid"},
            {"query": "pizza", "mode": "keyword"},
            {"query": "people", "filters": "width >= 100", "top_k": 10},
        ]
        searchers = [Searcher(server.url, bodies) for server in (first, second) for _ in range(2)]
        in_chroma = Observer(collection.count)
        apis = [Observer(api_count(server.url)) for server in (first, second)]
        added = copy_photos(coco_source, dataset, FIRST, ADDED)
        indexer = subprocess.run(
            [sys.executable, str(ROOT / "embed_images.py"), "--quiet"],
            env={**os.environ, **settings_env(settings)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        finished = time.monotonic()
        assert indexer.returncode == 0, indexer.stderr
        deadline = finished + VISIBLE_WITHIN_SECONDS
        while time.monotonic() < deadline and any(
            not api.seen or api.seen[-1][1] < FIRST + ADDED for api in apis
        ):
            time.sleep(0.1)
        for watcher in [*searchers, in_chroma, *apis]:
            watcher.stop.set()
            watcher.join()
        probe = {"image": data_uri(dataset / added[-1]["image"]), "top_k": 1, "include_images": "none"}
        for server in (first, second):
            hit = requests.post(f"{server.url}/search", json=probe, timeout=60).json()["results"][0]
            assert hit["path"] == added[-1]["image"] and hit["score"] >= 0.999
    assert [error for watcher in [*searchers, in_chroma, *apis] for error in watcher.errors] == []
    assert all(searcher.answered >= 5 for searcher in searchers)
    batches = sorted({count for _, count in in_chroma.seen if count > FIRST})
    assert len(batches) >= 3, f"the indexer's batches were not seen one by one: {batches}"
    lags = []
    for api in apis:
        counts = [count for _, count in api.seen]
        assert counts == sorted(counts), "an API went back to an older state"
        assert counts[-1] == FIRST + ADDED
        for count in batches:
            lag = first_seen(api.seen, count) - first_seen(in_chroma.seen, count)
            assert lag <= VISIBLE_WITHIN_SECONDS, f"{count} images: seen {lag:.1f} s after Chroma held them"
            lags.append(lag)
    answered = sum(searcher.answered for searcher in searchers)
    within = f"seen by both APIs within {max(lags):.1f} s"
    print(f"\n{len(batches)} batch states, {answered} searches, 0 errors; {within}")
