"""Benchmark 4: memory (RSS) and disk per indexed image; api.py start-up against the model load alone.

    python bench/scale.py [--sizes 10000 100000] [--repeats 2]

The RSS of `python api.py` serving an empty collection, then the synthetic 10k and 100k collections
(bench/synthetic.py), read from /proc once the server answers and again after 50 searches; the
difference divided by the number of images is the memory per image. Disk per image is the size of
the Chroma folder divided by the number of images. Start-up is the time from launching `python api.py`
to its first answer, against a fresh `python` that only imports and loads the same model.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from common import ROOT, ApiServer, folder_bytes, markdown_table, median, report, rss_mb, vit_b32_checkpoint
from synthetic import synthetic_collection

from config import Settings

MODEL_LOAD = """
import sys
sys.path.insert(0, {root!r})
from clip_encoder import ClipEncoder
ClipEncoder({model!r}, "cpu")
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--repeats", type=int, default=2, help="start-ups timed per collection")
    return parser.parse_args()


def empty_settings(folder: Path) -> Settings:
    (folder / "images").mkdir()
    return Settings(
        DATASET_FOLDER=str(folder / "images"),
        CHROMA_DB_PATH=str(folder / "chroma_db"),
        MODEL_NAME=str(vit_b32_checkpoint()),
        DEVICE="cpu",
        LOG_LEVEL="WARNING",
    )


def model_load_seconds() -> float:
    """Wall time of a fresh Python process that imports the encoder and loads the model."""
    script = MODEL_LOAD.format(root=str(ROOT), model=str(vit_b32_checkpoint()))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    return time.perf_counter() - started


def serve_and_measure(settings: Settings) -> tuple[float, float, float]:
    """(seconds from launch to first answer, RSS MB when ready, RSS MB after 50 searches)."""
    server = ApiServer(settings.with_overrides(RATE_LIMIT_PER_MINUTE=0))
    started = time.perf_counter()
    with server:
        ready = time.perf_counter() - started
        rss_ready = rss_mb(server.process.pid)
        with requests.Session() as session:
            for index in range(50):
                body = {"query": f"a photo number {index}", "top_k": 10}
                session.post(f"{server.url}/search", json=body, timeout=60).raise_for_status()
        rss_warm = rss_mb(server.process.pid)
    return ready, rss_ready, rss_warm


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    targets = {0: None, **{size: synthetic_collection(size) for size in args.sizes}}
    rows = []
    baseline = None
    with tempfile.TemporaryDirectory(prefix="bench-empty-") as empty:
        for size, collection in targets.items():
            settings = empty_settings(Path(empty)) if collection is None else collection.settings()
            startups, loads, rss_ready, rss_warm = [], [], [], []
            for _ in range(args.repeats):
                loads.append(model_load_seconds())
                ready, rss_at_ready, rss_after = serve_and_measure(settings)
                startups.append(ready)
                rss_ready.append(rss_at_ready)
                rss_warm.append(rss_after)
            ready_mb, warm_mb = median(rss_ready), median(rss_warm)
            baseline = baseline or (ready_mb, warm_mb)
            disk = folder_bytes(Path(settings.CHROMA_DB_PATH))
            rows.append(
                [
                    size,
                    median(startups),
                    median(loads),
                    median(startups) / median(loads),
                    ready_mb,
                    warm_mb,
                    (warm_mb - baseline[1]) * 1024 / size if size else "-",
                    disk / 1e6,
                    disk / 1024 / size if size else "-",
                ]
            )
            print(rows[-1], flush=True)
    table = markdown_table(
        [
            "images",
            "api.py start-up s",
            "model load alone s",
            "ratio",
            "RSS ready MB",
            "RSS after 50 searches MB",
            "RSS KB/image",
            "Chroma disk MB",
            "disk KB/image",
        ],
        rows,
    )
    notes = [
        f"Medians of {args.repeats} start-ups each, interleaved with the model-load process. Both are "
        "measured from process launch, so both include importing torch and CLIP; the start-up also opens "
        "Chroma and mirrors the collection (vectors + metadata) into memory.",
        "RSS KB/image = (RSS after 50 searches - the same for the empty collection) / images: the "
        "in-memory mirror (512 float32 = 2 KB per vector, metadata, keyword index) plus Chroma's HNSW "
        "graph and caches.",
    ]
    report("Scale: memory, disk and start-up", [table], notes, "ViT-B/32 architecture (512-d)")


if __name__ == "__main__":
    main()
