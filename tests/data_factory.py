"""Test data: a tiny CLIP checkpoint, captioned photos, broken files and synthetic vectors."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHARED_COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_mini"
CATEGORIES = ["dog", "cat", "car", "person", "boat", "pizza", "bicycle", "bird"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
# The stand-in for coco_mini holds as many photos as the largest test takes (test_faults: 20 + 60).
STAND_IN_PHOTOS = 96


def write_tiny_checkpoint(path: Path, seed: int = 0, embed_dim: int = 32) -> Path:
    """A CLIP with tiny widths and random weights (real 224 px input), saved as a state dict."""
    import torch
    from clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=embed_dim,
        image_resolution=224,
        vision_layers=2,
        vision_width=64,
        vision_patch_size=32,
        context_length=77,
        vocab_size=49408,
        transformer_width=64,
        transformer_heads=2,
        transformer_layers=2,
    )
    torch.save(model.state_dict(), path)
    return path


def coco_like_dataset(dest: Path) -> tuple[Path, list[dict]]:
    """(images folder, annotations) from ../shared/data/coco_mini, or a generated stand-in."""
    if (SHARED_COCO / "annotations.json").is_file():
        annotations = json.loads((SHARED_COCO / "annotations.json").read_text())
        images = dest / "images"
        shutil.copytree(SHARED_COCO / "images", images)
        return images, annotations
    return generated_captioned_images(dest / "images", STAND_IN_PHOTOS), json.loads(
        (dest / "images" / "annotations.json").read_text()
    )


def generated_captioned_images(folder: Path, count: int, seed: int = 0) -> Path:
    """Drawn scenes with captions and categories, in the annotation format of coco_mini."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    annotations = []
    for index in range(count):
        categories = sorted(rng.sample(CATEGORIES, rng.randint(1, 3)))
        colour = rng.choice(COLOURS)
        name = f"{index:012d}.jpg"
        drawn_scene(rng, (320, 240), colour).save(folder / name, quality=90)
        captions = [f"a {colour} picture with a {' and a '.join(categories)}"] * 5
        annotations.append({"image": name, "captions": captions, "categories": categories})
    (folder / "annotations.json").write_text(json.dumps(annotations))
    return folder


def drawn_scene(rng: random.Random, size: tuple[int, int], colour: str) -> Image.Image:
    image = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        fill = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse([x, y, x + rng.randint(10, 80), y + rng.randint(10, 80)], fill=fill)
    return image


def write_broken_files(folder: Path, sample_jpeg: Path) -> list[str]:
    """A truncated JPEG, a zero-byte .jpg and a text file named .png; returns their names."""
    data = sample_jpeg.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image\n")
    return ["truncated.jpg", "empty.jpg", "notes.png"]


def clustered_vectors(count: int, dim: int, clusters: int = 200, spread: float = 0.35, seed: int = 0):
    """Unit vectors grouped around random centres, like CLIP embeddings of a real collection."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, count)
    noise = rng.standard_normal((count, dim)).astype(np.float32) * spread / np.sqrt(dim)
    vectors = centres[labels] + noise
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32), labels
