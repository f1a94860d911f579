"""Synthetic collections of 10k / 100k images for the query benchmarks, cached under bench/data/.

Vectors are clustered like real CLIP embeddings (tests/data_factory.clustered_vectors, 512-d so the
ViT-B/32-architecture model can query them) and written through the engine (`ImageRetrieval.write`),
so the Chroma collection has exactly the engine's HNSW configuration. Every id has its own tiny
8x8 JPEG on disk, so `/thumbnails` works, and a `bucket` field (0..99, independent of the clusters)
gives filters of known selectivity: `bucket < 50` keeps 50%, `bucket < 10` 10%, `bucket < 1` 1%.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from common import DATA, vit_b32_checkpoint
from data_factory import clustered_vectors
from PIL import Image

from config import Settings
from indexer import image_id

log = logging.getLogger("bench.synthetic")

DIM = 512
WRITE_CHUNK = 5000
SELECTIVITY_FILTERS = {"50%": "bucket < 50", "10%": "bucket < 10", "1%": "bucket < 1"}


@dataclass
class SyntheticCollection:
    size: int
    folder: Path
    vectors: np.ndarray
    ids: list[str]
    buckets: np.ndarray

    @property
    def dataset(self) -> Path:
        return self.folder / "images"

    @property
    def db(self) -> Path:
        return self.folder / "chroma_db"

    def settings(self, **overrides: Any) -> Settings:
        return Settings(
            DATASET_FOLDER=str(self.dataset),
            CHROMA_DB_PATH=str(self.db),
            MODEL_NAME=str(vit_b32_checkpoint()),
            DEVICE="cpu",
            RESULTS_FOLDER=str(self.folder / "results"),
            LOG_LEVEL="WARNING",
        ).with_overrides(**overrides)

    def mask(self, bucket_below: int) -> np.ndarray:
        return self.buckets < bucket_below


def relative_path(index: int) -> str:
    return f"{index // 1000:03d}/{index:06d}.jpg"


def tiny_jpegs(variants: int = 64) -> list[bytes]:
    """Distinct 8x8 single-colour JPEGs."""
    rng = np.random.default_rng(1)
    encoded = []
    for _ in range(variants):
        out = io.BytesIO()
        Image.new("RGB", (8, 8), tuple(int(c) for c in rng.integers(0, 256, 3))).save(out, "JPEG")
        encoded.append(out.getvalue())
    return encoded


def synthetic_collection(size: int) -> SyntheticCollection:
    """The cached collection of `size` images, built on first use.

    Whoever opens it through the engine searches it with their HNSW_EF_SEARCH (the engine applies it).
    """
    folder = DATA / f"collection-{size}"
    vectors, _ = clustered_vectors(size, DIM, clusters=max(20, size // 50), seed=size)
    buckets = np.random.default_rng(size + 1).integers(0, 100, size)
    ids = [image_id(relative_path(i)) for i in range(size)]
    collection = SyntheticCollection(size, folder, vectors, ids, buckets)
    if not (folder / "complete").is_file():
        build(collection)
        (folder / "complete").write_text(str(size))
    return collection


def build(collection: SyntheticCollection) -> None:
    from image_retrieval import ImageRetrieval

    started = time.monotonic()
    metadatas = write_files(collection)
    with ImageRetrieval(collection.settings(), role="bench", rebuild=True) as engine:
        for start in range(0, collection.size, WRITE_CHUNK):
            chunk = slice(start, start + WRITE_CHUNK)
            engine.store.write(collection.ids[chunk], collection.vectors[chunk], metadatas[chunk])
            log.warning(
                "collection %d: %d written", collection.size, min(start + WRITE_CHUNK, collection.size)
            )
    seconds = time.monotonic() - started
    (collection.folder / "build_seconds").write_text(f"{seconds:.1f}")
    log.warning("collection %d built in %.0f s", collection.size, seconds)


def write_files(collection: SyntheticCollection) -> list[dict[str, Any]]:
    """One tiny JPEG per id, and each image's metadata as the indexer would store it."""
    jpegs = tiny_jpegs()
    hashes = [hashlib.sha256(data).hexdigest() for data in jpegs]
    now = time.time()
    metadatas = []
    for index in range(collection.size):
        relative = relative_path(index)
        path = collection.dataset / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        data = jpegs[index % len(jpegs)]
        path.write_bytes(data)
        metadatas.append(
            {
                "path": relative,
                "name": path.name,
                "folder": relative.split("/")[0],
                "width": 8,
                "height": 8,
                "file_size": len(data),
                "modified": path.stat().st_mtime,
                "content_hash": hashes[index % len(jpegs)],
                "format": "JPEG",
                "indexed": now,
                "bucket": int(collection.buckets[index]),
            }
        )
    return metadatas


def exact_top(vectors: np.ndarray, query: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k best rows by exact cosine (unit vectors), restricted to `mask`."""
    scores = vectors @ query
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    best = np.argpartition(-scores, k)[:k]
    return best[np.argsort(-scores[best], kind="stable")]
