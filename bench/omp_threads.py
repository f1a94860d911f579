"""Benchmark 5b: torch's OpenMP thread settings, each in a fresh process (they must be set at start-up).

    python bench/omp_threads.py [--texts 30] [--images 32]

On a machine whose cores are also busy with other work, OpenMP threads that spin while waiting for
each other can make small operations (one text query) many times slower. Each variant runs in its own
process with the ViT-B/32-architecture model: p50 of encoding one caption, and images/s of encoding
preprocessed photos in one batch. The variants run twice, interleaved; the better run is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import ROOT, markdown_table, report, vit_b32_checkpoint

VARIANTS = {
    "default (2 threads, OpenMP spin-waiting)": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
}
WORKER = """
import json, statistics, sys, time
sys.path.insert(0, {root!r})
import torch
from clip_encoder import ClipEncoder
from image_io import decode_for_model
from pathlib import Path
encoder = ClipEncoder({model!r}, "cpu")
files = sorted(Path({photos!r}).glob("*.jpg"))[:{images}]
pixels = torch.stack([encoder.preprocess_image(decode_for_model(f, 224, 100.0)[0]) for f in files])
encoder.encode_texts(["warm up"]); encoder.encode_pixels(pixels[:2])
times = []
for i in range({texts}):
    started = time.perf_counter()
    encoder.encode_texts([f"a photo of a dog on a beach, number {{i}}"])
    times.append(time.perf_counter() - started)
started = time.perf_counter()
encoder.encode_pixels(pixels)
print(json.dumps({{"text_ms": 1000 * statistics.median(times),
                  "images_per_second": len(pixels) / (time.perf_counter() - started),
                  "threads": torch.get_num_threads()}}))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=30)
    parser.add_argument("--images", type=int, default=32)
    return parser.parse_args()


def run_variant(env: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    from common import COCO_MINI

    script = WORKER.format(
        root=str(ROOT),
        model=str(vit_b32_checkpoint()),
        photos=str(COCO_MINI / "images"),
        images=args.images,
        texts=args.texts,
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    best: dict[str, dict[str, float]] = {}
    for _ in range(2):
        for label, env in VARIANTS.items():
            result = run_variant(env, args)
            kept = best.setdefault(label, result)
            kept["text_ms"] = min(kept["text_ms"], result["text_ms"])
            kept["images_per_second"] = max(kept["images_per_second"], result["images_per_second"])
    base = best["default (2 threads, OpenMP spin-waiting)"]
    rows = [
        [
            label,
            int(result["threads"]),
            result["text_ms"],
            base["text_ms"] / result["text_ms"],
            result["images_per_second"],
            result["images_per_second"] / base["images_per_second"],
        ]
        for label, result in best.items()
    ]
    table = markdown_table(
        ["variant", "torch threads", "text p50 ms", "text speed-up", "images/s", "image speed-up"], rows
    )
    notes = [
        "Same model, same inputs, same results (thread settings do not change the arithmetic beyond "
        "summation order). Each variant is a fresh process; better of 2 interleaved runs.",
    ]
    report("CPU inference: OpenMP thread settings", [table], notes, "ViT-B/32 architecture")


if __name__ == "__main__":
    main()
