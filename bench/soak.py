"""Soak: minutes of mixed queries against the real server; does its memory stay flat?

    python bench/soak.py [--minutes 4] [--clients 4] [--model tiny|vit]

`python api.py` (via tests/api_server.py) serves the coco_mini photos (or generated ones) with their
captions as metadata. Clients send a rotating mix of text, uploaded-image, similar_to, keyword, hybrid
and filtered searches, with and without inline thumbnails, for the given time. The server's resident
memory (RSS) is sampled at the start, every tenth of the run and at the end; the table goes to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

import requests
from common import COCO_MINI, ApiServer, markdown_table, models, percentile, report, rss_mb

from config import Settings

TEXTS = ["a dog", "a plate of food", "a street with cars", "two people", "a cat on a bed", "a boat"]
SAMPLES = 10


def dataset_with_metadata(folder: Path) -> tuple[Path, list[Path]]:
    """The photos and a metadata.json of their captions and categories."""
    import json

    from data_factory import coco_like_dataset

    if (COCO_MINI / "annotations.json").is_file():
        images, annotations = folder / "images", json.loads((COCO_MINI / "annotations.json").read_text())
        shutil.copytree(COCO_MINI / "images", images)
    else:
        images, annotations = coco_like_dataset(folder)
    records = [
        {"path": item["image"], "description": item["captions"][0], "tags": item["categories"]}
        for item in annotations
    ]
    (images / "metadata.json").write_text(json.dumps(records))
    return images, sorted(images.glob("*.jpg"))


def query_bodies(photos: list[Path], ids: list[str]) -> list[dict]:
    uploads = [
        "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode() for path in photos[:5]
    ]
    bodies: list[dict] = []
    for number, text in enumerate(TEXTS):
        bodies += [
            {"query": text},
            {"query": text, "include_images": "none", "top_k": 20},
            {"query": text.split()[-1], "mode": "keyword"},
            {"query": text, "mode": "hybrid", "top_k": 10},
            {"query": text, "filters": "width >= 400 and height >= 300", "include_images": "none"},
            {"image": uploads[number % len(uploads)]},
            {"similar_to": ids[number * 7 % len(ids)], "offset": 5},
            {"parts": [{"text": text}, {"id": ids[number], "weight": 0.5}], "include_images": "none"},
        ]
    return bodies


class Soak:
    """Clients sending the bodies in rotation until stopped; counts requests, errors and latencies."""

    def __init__(self, url: str, bodies: list[dict], clients: int) -> None:
        self.url, self.bodies = url, bodies
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(index,)) for index in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        session = requests.Session()
        for body in itertools.islice(itertools.cycle(self.bodies), index, None):
            if self._stop.is_set():
                return
            started = time.perf_counter()
            response = session.post(f"{self.url}/search", json=body, timeout=120)
            with self._lock:
                self.latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    self.errors.append(f"{response.status_code}: {response.text[:200]}")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def soak(minutes: float, clients: int, checkpoint: Path) -> tuple[list[list[object]], list[str]]:
    with tempfile.TemporaryDirectory(prefix="soak-") as temporary:
        folder = Path(temporary)
        images, photos = dataset_with_metadata(folder / "data")
        settings = Settings(
            DATASET_FOLDER=str(images),
            CHROMA_DB_PATH=str(folder / "db"),
            MODEL_NAME=str(checkpoint),
            DEVICE="cpu",
            RATE_LIMIT_PER_MINUTE=0,
            LOG_LEVEL="WARNING",
        )
        with ApiServer(settings, log_path=folder / "api.log") as server:
            requests.post(f"{server.url}/index", timeout=30)
            while requests.get(f"{server.url}/index", timeout=30).json()["state"] == "running":
                time.sleep(0.5)
            found = requests.post(
                f"{server.url}/search",
                json={"query": "a photo", "top_k": 50, "include_images": "none"},
                timeout=60,
            ).json()["results"]
            bodies = query_bodies(photos, [hit["id"] for hit in found])
            pid = server.process.pid
            rows = [[0.0, 0, f"{rss_mb(pid):.0f}"]]
            load = Soak(server.url, bodies, clients)
            started = time.monotonic()
            for sample in range(1, SAMPLES + 1):
                time.sleep(max(0.0, started + minutes * 60 * sample / SAMPLES - time.monotonic()))
                rows.append(
                    [round((time.monotonic() - started) / 60, 1), len(load.latencies), f"{rss_mb(pid):.0f}"]
                )
                logging.info("%.1f min: %d requests, RSS %s MB", *rows[-1])
            load.stop()
    latencies = load.latencies
    growth = float(rows[-1][2]) - float(rows[1][2])
    notes = [
        f"{len(latencies)} searches from {clients} clients, {len(load.errors)} errors; "
        f"p50 {percentile(latencies, 50) * 1000:.0f} ms, p95 {percentile(latencies, 95) * 1000:.0f} ms.",
        f"RSS at start (idle, after indexing) {rows[0][2]} MB, after the first tenth {rows[1][2]} MB, "
        f"at the end {rows[-1][2]} MB: growth over the run after warm-up {growth:+.0f} MB.",
        f"Mix ({len(bodies)} bodies in rotation): text, text top 20, keyword, hybrid, filtered, uploaded "
        "image (data URI), similar_to with offset, text + id parts; with and without inline thumbnails.",
    ]
    if load.errors:
        notes.append(f"First error: {load.errors[0]}")
    return rows, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--model", choices=["tiny", "vit"], default="tiny")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ((label, checkpoint),) = models(args.model).items()
    rows, notes = soak(args.minutes, args.clients, checkpoint)
    table = markdown_table(["minutes", "searches so far", "server RSS (MB)"], rows)
    report(f"Soak: {args.minutes:g} minutes of mixed queries (issue 8)", [table], notes, label)


if __name__ == "__main__":
    main()
