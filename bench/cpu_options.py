"""Benchmark 5: options that may speed up CPU inference: ONNX Runtime, bf16, torch threads, batch size.

    python bench/cpu_options.py [--images 64] [--rounds 2]

ViT-B/32 architecture. Image encoding: images/s on the same preprocessed coco_mini photos, every
option measured once per round, rounds interleaved, best round kept. Text encoding: p50 latency of one
caption (what a search pays). Each option's vectors are compared with the default (torch float32):
`max 1-cos` is the largest cosine distance between the two vectors of one input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import Callable, Iterator

import numpy as np
import torch
from common import COCO_MINI, ONNX_CACHE, Stopwatch, markdown_table, percentile, report, vit_b32_checkpoint

from clip_encoder import ClipEncoder
from image_io import decode_for_model

DEFAULT_BATCH = 32


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    return parser.parse_args()


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def encode_in_batches(encoder: ClipEncoder, pixels: torch.Tensor, batch: int) -> np.ndarray:
    return np.concatenate(
        [encoder.encode_pixels(pixels[i : i + batch]) for i in range(0, len(pixels), batch)]
    )


def image_options(encoder: ClipEncoder) -> dict[str, Callable[[torch.Tensor, int], np.ndarray]]:
    def torch_fp32(pixels: torch.Tensor, batch: int) -> np.ndarray:
        return encode_in_batches(encoder, pixels, batch)

    def one_thread(pixels: torch.Tensor, batch: int) -> np.ndarray:
        with torch_threads(1):
            return torch_fp32(pixels, batch)

    def bf16(pixels: torch.Tensor, batch: int) -> np.ndarray:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch_fp32(pixels, batch)

    onnx_encoder = ClipEncoder(encoder.name, "cpu", "onnx", str(ONNX_CACHE))  # the IMAGE_RUNTIME=onnx path

    def onnx_runtime(pixels: torch.Tensor, batch: int) -> np.ndarray:
        return encode_in_batches(onnx_encoder, pixels, batch)

    options = {f"torch fp32, batch {DEFAULT_BATCH} (default)": (torch_fp32, DEFAULT_BATCH)}
    options |= {f"torch fp32, batch {size}": (torch_fp32, size) for size in (1, 8, 16, 64)}
    options |= {
        f"torch fp32, 1 thread, batch {DEFAULT_BATCH}": (one_thread, DEFAULT_BATCH),
        f"torch bf16 autocast, batch {DEFAULT_BATCH}": (bf16, DEFAULT_BATCH),
        f"ONNX Runtime fp32, batch {DEFAULT_BATCH}": (onnx_runtime, DEFAULT_BATCH),
    }
    return {label: (lambda pixels, f=f, b=b: f(pixels, b)) for label, (f, b) in options.items()}


def text_options(encoder: ClipEncoder) -> dict[str, Callable[[str], np.ndarray]]:
    def default(text: str) -> np.ndarray:
        return encoder.encode_texts([text])

    def one_thread(text: str) -> np.ndarray:
        with torch_threads(1):
            return default(text)

    def bf16(text: str) -> np.ndarray:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return default(text)

    onnx_encoder = ClipEncoder(encoder.name, "cpu", onnx_cache=str(ONNX_CACHE), text_runtime="onnx")

    def onnx_runtime(text: str) -> np.ndarray:  # the TEXT_RUNTIME=onnx path
        return onnx_encoder.encode_texts([text])

    return {
        "torch fp32 (default)": default,
        "torch fp32, 1 thread": one_thread,
        "torch bf16 autocast": bf16,
        "ONNX Runtime fp32": onnx_runtime,
    }


def load_pixels(encoder: ClipEncoder, count: int) -> torch.Tensor:
    files = sorted((COCO_MINI / "images").glob("*.jpg"))[:count]
    images = [decode_for_model(path, encoder.input_resolution, 100.0)[0] for path in files]
    return torch.stack([encoder.preprocess_image(image) for image in images])


def captions(count: int) -> list[str]:
    annotations = json.loads((COCO_MINI / "annotations.json").read_text())
    return [entry["captions"][0] for entry in annotations[:count]]


def measure_images(encoder: ClipEncoder, pixels: torch.Tensor, rounds: int) -> list[list[object]]:
    options = image_options(encoder)
    reference = options[f"torch fp32, batch {DEFAULT_BATCH} (default)"](pixels)
    best = dict.fromkeys(options, 0.0)
    deviation = {}
    for _ in range(rounds):
        for label, run in options.items():
            run(pixels[:8])  # warm-up
            with Stopwatch() as watch:
                vectors = run(pixels)
            best[label] = max(best[label], len(pixels) / watch.seconds)
            deviation[label] = float(np.max(1 - np.sum(vectors * reference, axis=1)))
    base = best[f"torch fp32, batch {DEFAULT_BATCH} (default)"]
    return [[label, best[label], best[label] / base, f"{deviation[label]:.1e}"] for label in options]


def measure_texts(encoder: ClipEncoder, texts: list[str], rounds: int) -> list[list[object]]:
    options = text_options(encoder)
    reference = np.concatenate([options["torch fp32 (default)"](text) for text in texts])
    times: dict[str, list[float]] = {label: [] for label in options}
    deviation = {}
    for _ in range(rounds):
        for label, run in options.items():
            vectors = []
            for text in texts:
                with Stopwatch() as watch:
                    vectors.append(run(text))
                times[label].append(watch.seconds * 1000)
            deviation[label] = float(np.max(1 - np.sum(np.concatenate(vectors) * reference, axis=1)))
    base = percentile(times["torch fp32 (default)"], 50)
    return [
        [label, percentile(times[label], 50), base / percentile(times[label], 50), f"{deviation[label]:.1e}"]
        for label in options
    ]


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    encoder = ClipEncoder(str(vit_b32_checkpoint()), "cpu")
    image_rows = measure_images(encoder, load_pixels(encoder, args.images), args.rounds)
    text_rows = measure_texts(encoder, captions(50), args.rounds)
    tables = [
        markdown_table(["image encoding option", "images/s", "speed-up", "max 1-cos"], image_rows),
        markdown_table(["text encoding option (1 caption)", "p50 ms", "speed-up", "max 1-cos"], text_rows),
    ]
    notes = [
        f"{args.images} coco_mini photos, preprocessed once; best of {args.rounds} interleaved rounds; "
        f"torch default threads = {torch.get_num_threads()}. The CPU has no AVX-512/AMX, so bf16 is "
        "emulated. ONNX: `IMAGE_RUNTIME=onnx` (clip_encoder.OnnxTower: the visual tower exported with "
        "torch.onnx, opset 17, CPUExecutionProvider, intra-op threads = torch threads); `TEXT_RUNTIME=onnx` "
        "(clip_encoder.OnnxTower: the text tower, its length a free dimension, run up to the end token).",
    ]
    report("CPU inference options", tables, notes, "ViT-B/32 architecture")


if __name__ == "__main__":
    main()
