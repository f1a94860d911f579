"""Benchmark 1: images/s of `embed_images.py` end to end against raw batched `encode_image`.

    python bench/ingestion.py [--models both|vit|tiny] [--photos 256] [--large 64] [--batch-size 32]

Two corpora, cached under bench/data/: the real 640 px COCO photos of ../shared/data/coco_mini
repeated to `--photos` files (each copy made unique by a trailer after the JPEG end marker, so the
indexer encodes it instead of reusing the vector of an identical file), and `--large` generated
12-megapixel JPEGs. For each model and corpus, in one run: raw `encode_pixels` throughput on the
same images already decoded and preprocessed, then `embed_images.py` into a fresh database, then raw
again; the ratio uses the mean of the two raw runs. Target: end to end >= 0.85x raw.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import COCO_MINI, DATA, ONNX_CACHE, ROOT, Stopwatch, markdown_table, models, report
from PIL import Image

from clip_encoder import ClipEncoder
from image_io import decode_for_model, file_hash

TARGET = 0.85
LARGE_SIZE = (4000, 3000)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", choices=["both", "vit", "tiny"], default="both")
    parser.add_argument("--photos", type=int, default=256, help="files made from the coco_mini photos")
    parser.add_argument("--large", type=int, default=64, help="generated 12-megapixel JPEGs")
    parser.add_argument("--batch-size", type=int, default=32)
    return parser.parse_args()


def photo_corpus(count: int) -> Path:
    """coco_mini's photos repeated to `count` distinct files."""
    folder = DATA / f"ingest-photos-{count}"
    if not folder.is_dir():
        sources = sorted((COCO_MINI / "images").glob("*.jpg"))
        folder.mkdir(parents=True)
        for index in range(count):
            source = sources[index % len(sources)]
            trailer = f"bench copy {index}".encode()
            (folder / f"{index:04d}_{source.name}").write_bytes(source.read_bytes() + trailer)
    return folder


def large_corpus(count: int) -> Path:
    """Generated 12-megapixel photos-like JPEGs: smooth structure plus sensor-like noise."""
    folder = DATA / f"ingest-12mp-{count}"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        rng = np.random.default_rng(3)
        width, height = LARGE_SIZE
        for index in range(count):
            base = rng.integers(0, 256, (height // 40, width // 40, 3), dtype=np.uint8)
            image = Image.fromarray(base).resize(LARGE_SIZE, Image.Resampling.BICUBIC)
            noise = rng.normal(0, 10, (height, width, 3))
            pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"large_{index:03d}.jpg", quality=90)
    return folder


def preprocessed(encoder: ClipEncoder, folder: Path) -> torch.Tensor:
    tensors = []
    for path in sorted(folder.glob("*.jpg")):
        image, _ = decode_for_model(path, encoder.input_resolution, 100.0)
        tensors.append(encoder.preprocess_image(image))
    return torch.stack(tensors)


def raw_images_per_second(encoder: ClipEncoder, pixels: torch.Tensor, batch_size: int) -> float:
    with Stopwatch() as watch:
        for start in range(0, len(pixels), batch_size):
            encoder.encode_pixels(pixels[start : start + batch_size])
    return len(pixels) / watch.seconds


def stage_costs(encoder: ClipEncoder, folder: Path, pixels: torch.Tensor, batch_size: int) -> list[float]:
    """Milliseconds per image of each indexing stage, one at a time: hash, decode + preprocess (one
    thread), encode (all torch threads); and the 2-core ceiling of the end-to-end/raw ratio they imply."""
    files = sorted(folder.glob("*.jpg"))
    with Stopwatch() as hashing:
        for path in files:
            file_hash(path)
    with Stopwatch() as decoding:
        for path in files:
            image, _ = decode_for_model(path, encoder.input_resolution, 100.0)
            encoder.preprocess_image(image)
    encode_ms = 1000 / raw_images_per_second(encoder, pixels, batch_size)
    hash_ms, decode_ms = 1000 * hashing.seconds / len(files), 1000 * decoding.seconds / len(files)
    cores = os.cpu_count() or 1
    encode_cpu = encode_ms * min(cores, torch.get_num_threads())
    ceiling = encode_cpu / (encode_cpu + hash_ms + decode_ms)
    return [hash_ms, decode_ms, encode_ms, ceiling]


def end_to_end(
    checkpoint: Path, folder: Path, batch_size: int, runtime: str = "torch"
) -> tuple[float, float]:
    """(images/s of the indexer's run as embed_images.py reports it, images/s including start-up)."""
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as db:
        env = {**os.environ, "DEVICE": "cpu", "LOG_LEVEL": "WARNING", "IMAGE_RUNTIME": runtime}
        env["ONNX_CACHE_FOLDER"] = str(ONNX_CACHE)
        command = [
            sys.executable,
            str(ROOT / "embed_images.py"),
            "--quiet",
            *("--dataset", str(folder), "--db", db, "--model", str(checkpoint)),
            *("--batch-size", str(batch_size)),
        ]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
        wall = time.perf_counter() - started
    line = next(line for line in done.stdout.splitlines() if line.startswith("added "))
    encoded = int(line.split("encoded ")[1].split()[0])
    reported = float(line.split("(")[1].split()[0])
    return reported, encoded / wall


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    corpora = {
        f"coco_mini photos 640 px x{args.photos}": photo_corpus(args.photos),
        f"generated 12 MP JPEGs x{args.large}": large_corpus(args.large),
    }
    rows, stage_rows = [], []
    for label, checkpoint in models(args.models).items():
        encoder = ClipEncoder(str(checkpoint), "cpu")
        ClipEncoder(str(checkpoint), "cpu", "onnx", str(ONNX_CACHE))  # exports once, outside the timings
        for corpus, folder in corpora.items():
            pixels = preprocessed(encoder, folder)
            raw_images_per_second(encoder, pixels[: args.batch_size], args.batch_size)  # warm-up
            before = raw_images_per_second(encoder, pixels, args.batch_size)
            indexed, with_startup = end_to_end(checkpoint, folder, args.batch_size)
            onnx, _ = end_to_end(checkpoint, folder, args.batch_size, "onnx")
            after = raw_images_per_second(encoder, pixels, args.batch_size)
            raw = (before + after) / 2
            rows.append(
                [label, corpus, len(pixels), raw, indexed, indexed / raw, with_startup, onnx, onnx / raw]
            )
            stage_rows.append([label, corpus, *stage_costs(encoder, folder, pixels, args.batch_size)])
            print(rows[-1], stage_rows[-1], flush=True)
    table = markdown_table(
        [
            "model",
            "corpus",
            "files",
            "raw encode img/s",
            "embed_images.py img/s",
            "ratio",
            "incl. start-up",
            "IMAGE_RUNTIME=onnx img/s",
            "onnx ratio",
        ],
        rows,
    )
    stages = markdown_table(
        [
            "model",
            "corpus",
            "hash ms/img",
            "decode+preprocess ms/img (1 thread)",
            "encode ms/img",
            "2-core ceiling of the ratio",
        ],
        stage_rows,
    )
    notes = [
        "Ceiling = encode CPU time / (encode CPU time + hash + decode): with every core busy in the "
        "model during raw encoding, the end-to-end run must find the CPU time of hashing and decoding "
        "somewhere, so no pipelining can beat this ratio on this machine.",
        f"Batch size {args.batch_size}, torch threads {torch.get_num_threads()}, LOADER_THREADS default. "
        "`embed_images.py img/s` is the rate its summary line reports (walk, hash, decode, preprocess, "
        "encode, store); `incl. start-up` divides by the whole process time (imports, model load).",
        "`IMAGE_RUNTIME=onnx`: the same embed_images.py run with images encoded by ONNX Runtime; its "
        "ratio is against the same raw torch encoding, so above 1 means faster than torch can encode.",
        f"Target: ratio >= {TARGET} (it applies to the ViT-B/32 architecture: the tiny test model "
        "encodes so fast that decoding alone bounds it).",
    ]
    report(
        "Ingestion: embed_images.py against raw encode_image",
        [table, stages],
        notes,
        ", ".join(models(args.models)),
    )


if __name__ == "__main__":
    main()
