"""Benchmark 4: the engine from 100k to 1M images: build, disk, memory, start-up, latency, recall.

    python bench/scale.py [--sizes 100000 250000 500000 1000000] [--queries 200] [--warm-only]

For each size, the synthetic collection (bench/synthetic.py: clustered 512-d vectors and metadata
written straight into the store, cached under bench/data/) is served by `python api.py`:

- build: the time it took to write the collection (recorded when it was built);
- disk: Chroma's folder and the mirror's, per image;
- start-up: launch to first answer with the mirror on disk ("warm", every start after the first) and
  once without it ("cold": the mirror rebuilt from Chroma, as after an upgrade or a crash), against a
  fresh process that only loads the model; after the cold start, the time its product codes took to
  train in the background (FIRST_PASS_MIN), and how the warm server's exact searches chose candidates;
- memory: RSS of api.py once ready and after the queries, and of a process that opens the same
  collection with Chroma alone and queries it once (Chroma's own memory: its HNSW graph and caches);
  "mirror KB/image" is the difference of the two, per image, above the same for an empty collection;
- latency over HTTP, p50/p95/p99: text (against its encoding alone), text with 1 % and 50 % filters,
  more-like-this, keyword; and the one-off cost of a filter's first use (a field's first filter, then
  a new filter on the same field, for `bucket` and the `modified` time stamps);
- recall@10 against exact cosine of text queries (their encodings, computed here with the same model,
  are the hard case: random directions to the library), unfiltered and with the 1 % and 50 % filters,
  and of more like this (a stored vector, that image left out).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import requests
from common import (
    ApiServer,
    Stopwatch,
    folder_bytes,
    markdown_table,
    percentile,
    report,
    rss_mb,
    vit_b32_checkpoint,
)
from query_latency import captions, milliseconds, paired, post_search
from synthetic import SyntheticCollection, exact_top, relative_path, synthetic_collection

from catalog import RECENT_FIELDS_FILE
from clip_encoder import ClipEncoder
from config import Settings

K = 10
LATENCY_COLUMNS = [
    "images",
    "first pass",
    "query",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "p99/p50",
    "encode p50 ms",
    "server encode p50 ms",
    "p50 of each request - its server encode ms",
    "first use ms",
]
# A cold start at 1M images reads every record from Chroma: minutes, not the tests' 3.
START_TIMEOUT_SECONDS = 3600.0
READ_CHUNK_BYTES = 1 << 24
FILTERS = {"1 %": ("bucket < 1", 1), "50 %": ("bucket < 50", 50)}
CHROMA_ALONE = """
import resource, sys, chromadb
from chromadb.config import Settings
client = chromadb.PersistentClient(path=sys.argv[1], settings=Settings(anonymized_telemetry=False))
collection = client.get_or_create_collection("image_embeddings", embedding_function=None)
if collection.count():
    collection.query(query_embeddings=[[1.0] + [0.0] * 511], n_results=10, include=[])
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        print(int(line.split()[1]) / 1024)
"""
MODEL_LOAD = """
import sys
sys.path.insert(0, {root!r})
from clip_encoder import ClipEncoder
ClipEncoder({model!r}, "cpu")
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100000, 250000, 500000, 1000000])
    parser.add_argument("--queries", type=int, default=200, help="queries of each kind")
    parser.add_argument(
        "--warm-only",
        action="store_true",
        help="keep the mirror on disk and skip the cold start (its columns read '-')",
    )
    return parser.parse_args()


def model_load_seconds(settings: Settings) -> float:
    script = MODEL_LOAD.format(root=str(Path(__file__).resolve().parents[1]), model=settings.MODEL_NAME)
    with Stopwatch() as watch:
        subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    return watch.seconds


def chroma_alone_mb(db: Path) -> float:
    """RSS of a process that opens the collection with Chroma alone and queries it once."""
    found = subprocess.run([sys.executable, "-c", CHROMA_ALONE, str(db)], check=True, capture_output=True)
    return float(found.stdout.split()[-1])


def mirror_path(settings: Settings) -> Path:
    return Path(settings.CHROMA_DB_PATH) / "mirror"


def measured_server(settings: Settings, extra_env: dict[str, str] | None = None) -> ApiServer:
    """api.py (with `extra_env` in its environment) without the record of the fields recent searches
    read (catalog.RECENT_FIELDS_FILE), so that it does not read them again in the background while it
    is measured, and a filter's first use is one."""
    for record in mirror_path(settings).rglob(RECENT_FIELDS_FILE):
        record.unlink()
    return ApiServer(settings, extra_env=extra_env, start_timeout=START_TIMEOUT_SECONDS)


def read_into_page_cache(folder: Path) -> None:
    """Read every file under `folder` once, so that a server measured next does not wait on the disk
    while its background thread maps the mirror's vectors (a run whose page cache had lost them
    measured its first text queries 10 ms slower)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as file:
                for _ in iter(lambda file=file: file.read(READ_CHUNK_BYTES), b""):
                    pass


def start_seconds(settings: Settings) -> float:
    """Launch of api.py to its first answer."""
    started = time.perf_counter()
    with measured_server(settings):
        return time.perf_counter() - started


def cold_start_seconds(settings: Settings) -> tuple[float, float]:
    """Launch of api.py to its first answer with the mirror rebuilt, and from then on to its first
    pass settled (the product codes trained in the background, then saved for the next start)."""
    started = time.perf_counter()
    with measured_server(settings) as server:
        ready = time.perf_counter() - started
        first_pass(server.url)
        return ready, time.perf_counter() - started - ready


def first_pass(url: str) -> str:
    """How the server's exact searches choose their candidates, once no build of codes is under way."""
    while True:
        state = requests.get(f"{url}/", timeout=60).json()["first_pass"]
        if state != "codes building":
            return state
        time.sleep(0.5)


class Sizes:
    """One collection's measurements, as table rows."""

    def __init__(
        self, collection: SyntheticCollection, encoder: ClipEncoder, queries: int, warm_only: bool = False
    ) -> None:
        self.collection = collection
        self.warm_only = warm_only
        self.encoder = encoder
        self.texts = captions(queries)
        self.settings = collection.settings(RATE_LIMIT_PER_MINUTE=0, API_THREADS=4)
        self.first_use_rows: list[list[object]] = []

    def run(self, empty: dict[str, float]) -> tuple[list[object], list[list[object]], list[list[object]]]:
        size = self.collection.size
        load = model_load_seconds(self.settings)
        cold, codes = ("-", "-") if self.warm_only else self.cold_start()
        warm = start_seconds(self.settings)
        chroma_mb = chroma_alone_mb(self.collection.db)
        read_into_page_cache(mirror_path(self.settings))
        server = measured_server(self.settings)
        with server, requests.Session() as session:
            ready_mb = rss_mb(server.process.pid)
            used = first_pass(server.url)
            latency = self.latency(session, server.url, used)
            recall = self.recall(session, server.url)
            warm_mb = rss_mb(server.process.pid)
        if used != "scan":
            latency += self.latency_with_scan()
        mirror_kb = ((warm_mb - empty["api"]) - (chroma_mb - empty["chroma"])) * 1024 / size
        chroma_disk = folder_bytes(self.collection.db) - folder_bytes(mirror_path(self.settings))
        mirror_disk = folder_bytes(mirror_path(self.settings))
        build = self.collection.folder / "build_seconds"
        summary = [
            size,
            float(build.read_text()) if build.is_file() else "-",
            chroma_disk / 1024 / size,
            mirror_disk / 1024 / size,
            load,
            warm,
            warm - load,
            cold,
            codes,
            used,
            ready_mb,
            warm_mb,
            chroma_mb,
            mirror_kb,
        ]
        return summary, latency, recall

    def cold_start(self) -> tuple[float, float]:
        shutil.rmtree(mirror_path(self.settings), ignore_errors=True)
        return cold_start_seconds(self.settings)

    def latency_with_scan(self) -> list[list[object]]:
        """The same queries with the product codes turned off (FIRST_PASS_MIN=0), on the same mirror."""
        settings = self.settings.with_overrides(FIRST_PASS_MIN=0)
        read_into_page_cache(mirror_path(settings))
        with (
            measured_server(settings) as server,
            requests.Session() as session,
        ):
            return self.latency(session, server.url, first_pass(server.url))

    def latency(self, session: requests.Session, url: str, used: str) -> list[list[object]]:
        size = self.collection.size

        stages: dict[str, list[float]] = defaultdict(list)

        def text_pairs(filters: str | None, mode: str = "vector") -> list:
            bodies = [{"query": text, "top_k": K, "filters": filters, "mode": mode} for text in self.texts]
            return [
                (lambda t=text: self.encoder.encode_texts([t]), post_search(session, url, body, stages))
                for text, body in zip(self.texts, bodies, strict=True)
            ]

        uses = self.first_uses(session, url)
        self.first_use_rows += [[size, used, label, f"`{spec}`", ms] for label, spec, ms in uses]
        first_use = {label: ms for label, _, ms in uses}
        encode_ms, text_ms = paired(text_pairs(None))
        server_encodes = stages["encode"][-len(text_ms) :]  # no warm-up
        beyond = [request - encode for request, encode in zip(text_ms, server_encodes, strict=True)]
        server_encode, beyond_p50 = percentile(server_encodes, 50), percentile(beyond, 50)
        rows = [
            [size, used, "text", *spread(text_ms), percentile(encode_ms, 50), server_encode, beyond_p50, "-"]
        ]
        for label, (spec, _) in FILTERS.items():
            _, filtered_ms = paired(text_pairs(spec))
            rows.append(
                [size, used, f"text + {label} filter", *spread(filtered_ms), "-", "-", "-", first_use[label]]
            )
        rng = np.random.default_rng(size)
        similar = [
            post_search(session, url, {"similar_to": self.collection.ids[i], "top_k": K})
            for i in rng.choice(size, len(self.texts), replace=False)
        ]
        _, similar_ms = paired([(lambda: None, send) for send in similar])
        rows.append([size, used, "more like this", *spread(similar_ms), "-", "-", "-", "-"])
        names = [f"{i:06d}" for i in rng.choice(size, len(self.texts), replace=False)]
        keyword = [
            post_search(session, url, {"query": name, "mode": "keyword", "top_k": K}) for name in names
        ]
        _, keyword_ms = paired([(lambda: None, send) for send in keyword])
        rows.append([size, used, "keyword (file name)", *spread(keyword_ms), "-", "-", "-", "-"])
        return rows

    def first_uses(self, session: requests.Session, url: str) -> list[tuple[str, str, float]]:
        """The first query with each filter of a fresh server, in order: a field's first filter reads
        the field, the next one on it finds it read (label, filter, ms)."""
        middle = str(round(file_time(self.collection, 0) / 2 + file_time(self.collection, -1) / 2, 3))
        filters = [
            *[(label, spec) for label, (spec, _) in FILTERS.items()],
            ("modified, later half", f"modified >= {middle}"),
            ("modified, earlier half", f"modified < {middle}"),
        ]
        return [
            (
                label,
                spec,
                milliseconds(post_search(session, url, {"query": "a dog", "top_k": K, "filters": spec})),
            )
            for label, spec in filters
        ]

    def recall(self, session: requests.Session, url: str) -> list[list[object]]:
        """Recall@10 against exact cosine of text queries, unfiltered and filtered, and of more like
        this (a stored image's vector, that image left out)."""
        rows = []
        collection = self.collection
        vectors = self.encoder.encode_texts(self.texts)
        for label, (spec, below) in {"none": (None, None), **FILTERS}.items():
            mask = None if below is None else collection.mask(below)
            recalls = []
            for text, vector in zip(self.texts, vectors, strict=True):
                found = found_ids(session, url, {"query": text, "filters": spec})
                truth = {collection.ids[i] for i in exact_top(collection.vectors, vector, K, mask)}
                recalls.append(len(found & truth) / K)
            rows.append([collection.size, "text", label, len(recalls), np.mean(recalls), min(recalls)])
        recalls = []
        for i in np.random.default_rng(collection.size + 1).choice(collection.size, len(self.texts)):
            found = found_ids(session, url, {"similar_to": collection.ids[i]})
            best = [j for j in exact_top(collection.vectors, collection.vectors[i], K + 1) if j != i]
            recalls.append(len(found & {collection.ids[j] for j in best[:K]}) / K)
        rows.append([collection.size, "more like this", "none", len(recalls), np.mean(recalls), min(recalls)])
        return rows


def found_ids(session: requests.Session, url: str, body: dict[str, object]) -> set[str]:
    """The ids of one search's top 10 (no thumbnails, no folding of near-duplicates)."""
    body = {**body, "top_k": K, "include_images": "none", "collapse_duplicates": False}
    response = session.post(f"{url}/search", json=body, timeout=120)
    response.raise_for_status()
    return {hit["id"] for hit in response.json()["results"]}


def spread(values: list[float]) -> list[float]:
    p50, p99 = percentile(values, 50), percentile(values, 99)
    return [p50, percentile(values, 95), p99, p99 / p50]


def empty_baseline() -> dict[str, float]:
    """RSS of api.py and of Chroma alone with an empty collection."""
    with tempfile.TemporaryDirectory(prefix="bench-empty-") as folder:
        (Path(folder) / "images").mkdir()
        settings = Settings(
            DATASET_FOLDER=str(Path(folder) / "images"),
            CHROMA_DB_PATH=str(Path(folder) / "chroma_db"),
            MODEL_NAME=str(vit_b32_checkpoint()),
            DEVICE="cpu",
            LOG_LEVEL="WARNING",
            RATE_LIMIT_PER_MINUTE=0,
        )
        with ApiServer(settings) as server:
            api = rss_mb(server.process.pid)
        return {"api": api, "chroma": chroma_alone_mb(Path(settings.CHROMA_DB_PATH))}


def file_time(collection: SyntheticCollection, index: int) -> float:
    return (collection.dataset / relative_path(index % collection.size)).stat().st_mtime


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    encoder = ClipEncoder(str(synthetic_collection(args.sizes[0]).settings().MODEL_NAME), "cpu")
    empty = empty_baseline()
    summaries, latencies, recalls, first_uses = [], [], [], []
    for size in args.sizes:
        sizes = Sizes(synthetic_collection(size), encoder, args.queries, args.warm_only)
        summary, latency, recall = sizes.run(empty)
        summaries.append(summary)
        latencies += latency
        recalls += recall
        first_uses += sizes.first_use_rows
        for line in [summary, *latency, *recall]:
            print(line, flush=True)
    tables = [
        markdown_table(
            [
                "images",
                "build s",
                "Chroma disk KB/image",
                "mirror disk KB/image",
                "model load s",
                "api.py ready s (warm)",
                "ready - model load s",
                "ready s (cold: mirror rebuilt)",
                "then codes s",
                "first pass",
                "RSS ready MB",
                "RSS after queries MB",
                "Chroma alone MB",
                "mirror KB/image",
            ],
            summaries,
        ),
        markdown_table(LATENCY_COLUMNS, latencies),
        markdown_table(["images", "first pass", "first use of a filter", "filter", "ms"], first_uses),
        markdown_table(["images", "query", "filter", "queries", "recall@10", "worst query"], recalls),
    ]
    notes = [
        f"Empty collection: api.py RSS {empty['api']:.0f} MB, Chroma alone {empty['chroma']:.0f} MB. "
        "mirror KB/image = ((api.py RSS after queries - empty) - (Chroma alone - empty)) / images: what the "
        "engine holds beyond Chroma (ids, row map, memory-mapped vector pages touched, SQLite caches).",
        "Latency: POST /search over HTTP, top 10 with thumbnails, one client, keep-alive, "
        "API_THREADS=4, the mirror's files read into the page cache before the server starts, after 10 "
        "warm-up queries; `first use` is the first query with that filter "
        "(its mask is computed once per filter and mirror version, then cached). `encode p50` is this "
        "client's encoding of the same captions, timed in alternating blocks of ten with the requests "
        "(bench/query_latency.py, `paired`); `server encode p50` the server's own, from its "
        "Server-Timing header, and the next column the median over requests of each one's time less "
        "its own server encoding (paired request by request, so that neither the captions' lengths nor "
        "the machine's drift between blocks weigh on it).",
        "First use of a filter: the first query with it (`a dog`, over HTTP, encoding included) on a fresh "
        "server, in the order listed: the first filter on a field reads that field of every image, a later "
        "one finds it read (columns.py).",
        "Targets at the largest size: ready <= model load + 5 s; mirror <= 3 KB/image; text p50 <= "
        "encode + 15 ms and p99 <= 3x p50; more like this p50 <= 30 ms; recall@10 >= 0.99.",
    ]
    report("Scale: 100k to 1M images", tables, notes, "ViT-B/32 architecture (512-d)")


if __name__ == "__main__":
    main()
