"""A corpus of hostile and unusual image files, made on the spot, with what indexing must do with each.

    corpus = write_corrupt_corpus(dataset, outside)

Every entry says whether the file must be indexed (then `reference` gives the picture as the test
itself converts it to upright 8-bit RGB, and `size` its upright width x height) or skipped (then
`reason` is a phrase the skip message must contain). `outside` receives the files that symlinks in the
dataset point to; nothing there may ever be indexed or served.
"""

from __future__ import annotations

import io
import os
import random
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

EXIF_ORIENTATION = 0x0112
SECRET_TEXT = "TOP-SECRET-6f1c: this file lies outside the dataset folder"


@dataclass(frozen=True)
class CorpusFile:
    name: str
    indexed: bool
    reason: str = ""
    size: tuple[int, int] | None = None
    reference: Callable[[Path], Image.Image] | None = None
    readable: bool = True


def scene(size: tuple[int, int], seed: int) -> Image.Image:
    """A picture of coloured shapes, different for each seed."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        fill = tuple(rng.randrange(256) for _ in range(3))
        corner = (x + rng.randint(1, size[0] // 2 + 1), y + rng.randint(1, size[1] // 2 + 1))
        draw.rectangle([x, y, *corner], fill=fill)
    return image


def as_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def gray16_as_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        pixels = np.asarray(image, dtype=np.uint32)
    return Image.fromarray((pixels // 257).astype(np.uint8), "L").convert("RGB")


def palette_over_white(path: Path) -> Image.Image:
    with Image.open(path) as image:
        indices = np.asarray(image)
        transparent = image.info["transparency"]
        rgb = np.asarray(image.convert("RGB")).copy()
    rgb[indices == transparent] = 255
    return Image.fromarray(rgb, "RGB")


def exif6_upright(path: Path) -> Image.Image:
    """Orientation 6: the stored pixels must be turned 90 degrees clockwise to stand upright."""
    with Image.open(path) as image:
        return image.convert("RGB").transpose(Image.Transpose.ROTATE_270)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` pixels but holds almost no data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + (chunk(b"IEND", b""))
    )


def bad_exif_jpeg() -> bytes:
    """A JPEG that decodes, but whose EXIF block is damaged so that Pillow's exif_transpose raises."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Camera" * 10
    base = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(base, "JPEG", exif=exif.tobytes())
    good = base.getvalue()
    start = good.find(b"Exif")
    rng = random.Random(1)
    for _ in range(5000):
        mutated = bytearray(good)
        for _ in range(3):
            mutated[rng.randrange(start, start + 120)] = rng.randrange(256)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                image = Image.open(io.BytesIO(bytes(mutated)))
                image.load()
            except Exception:
                continue
            try:
                ImageOps.exif_transpose(image)
            except Exception:
                return bytes(mutated)
    raise AssertionError("no mutation broke exif_transpose")


def rare_format_bytes(kind: str) -> bytes:
    """A small picture in a format Pillow reads but the engine refuses (ICO, PPM, SGI, JPEG 2000, ...)."""
    out = io.BytesIO()
    scene((40, 30), 14).save(out, kind)
    return out.getvalue()


def float_as_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        pixels = np.asarray(image, dtype=np.float64)
    scale = 255.0 / 65535.0 if pixels.max() > 255 else 1.0
    return Image.fromarray(np.clip(pixels * scale, 0, 255).astype(np.uint8), "L").convert("RGB")


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92, **options)
    return out.getvalue()


def write_corrupt_corpus(dataset: Path, outside: Path) -> list[CorpusFile]:
    dataset.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    return [
        *_write_broken(dataset),
        *_write_unusual(dataset),
        *_write_refused_formats(dataset),
        *_write_links(dataset, outside),
    ]


def _write_broken(dataset: Path) -> list[CorpusFile]:
    whole = jpeg_bytes(scene((320, 240), 1))
    (dataset / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (dataset / "zero bytes.jpg").write_bytes(b"")
    (dataset / "random.jpg").write_bytes(random.Random(7).randbytes(5000))
    (dataset / "text.png").write_text("this is a text file, not a PNG\n")
    (dataset / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    return [
        CorpusFile("truncated.jpg", False, "corrupt or truncated"),
        CorpusFile("zero bytes.jpg", False, "empty file"),
        CorpusFile("random.jpg", False, "not an image"),
        CorpusFile("text.png", False, "not an image"),
        CorpusFile("bomb.png", False, "too large"),
    ]


def _write_unusual(dataset: Path) -> list[CorpusFile]:
    scene((300, 220), 2).convert("CMYK").save(dataset / "cmyk.jpg", quality=92)
    ramp = np.add.outer(np.arange(180, dtype=np.uint32) * 300, np.arange(240, dtype=np.uint32) * 40)
    Image.fromarray(ramp.astype(np.uint16)).save(dataset / "gray16.png")
    _palette_with_transparency().save(dataset / "palette alpha.png", transparency=0)
    frames = [scene((200, 150), seed) for seed in (3, 4, 5)]
    frames[0].save(dataset / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    (dataset / "exif rotated.jpg").write_bytes(jpeg_bytes(scene((320, 200), 6), exif=exif.tobytes()))
    Image.new("RGB", (1, 1), (200, 30, 90)).save(dataset / "one pixel.png")
    scene((10000, 3), 8).save(dataset / "elongated.png")
    scene((260, 200), 9).save(dataset / "Crème brûlée à Zürich – été.jpg", quality=92)
    scene((240, 240), 10).save(dataset / "plain.jpg", quality=92)
    return [
        CorpusFile("cmyk.jpg", True, size=(300, 220), reference=as_rgb),
        CorpusFile("gray16.png", True, size=(240, 180), reference=gray16_as_rgb),
        CorpusFile("palette alpha.png", True, size=(220, 160), reference=palette_over_white),
        CorpusFile("animated.gif", True, size=(200, 150), reference=as_rgb),
        CorpusFile("exif rotated.jpg", True, size=(200, 320), reference=exif6_upright),
        CorpusFile("one pixel.png", True, size=(1, 1), reference=as_rgb),
        CorpusFile("elongated.png", True, size=(10000, 3), reference=as_rgb),
        CorpusFile("Crème brûlée à Zürich – été.jpg", True, size=(260, 200), reference=as_rgb),
        CorpusFile("plain.jpg", True, size=(240, 240), reference=as_rgb),
    ]


def _write_refused_formats(dataset: Path) -> list[CorpusFile]:
    """Formats outside the photo formats, each behind a photo file name, and a damaged EXIF block."""
    entries = []
    disguised = {"ICO": "icon.png", "PPM": "pixmap.jpg", "SGI": "sgi.png", "JPEG2000": "j2k.jpg"}
    for kind, name in disguised.items():
        (dataset / name).write_bytes(rare_format_bytes(kind))
        entries.append(CorpusFile(name, False, "unrecognised format"))
    (dataset / "bad exif.jpg").write_bytes(bad_exif_jpeg())
    ramp = np.add.outer(np.arange(90, dtype=np.float32) * 2.5, np.arange(120, dtype=np.float32))
    Image.fromarray(ramp).save(dataset / "float.tif")
    return [
        *entries,
        # Its orientation (6) still reads, although Pillow's exif_transpose raises on the block.
        CorpusFile("bad exif.jpg", True, size=(48, 64), reference=as_rgb),
        CorpusFile("float.tif", True, size=(120, 90), reference=float_as_rgb),
    ]


def _palette_with_transparency() -> Image.Image:
    """A palette image whose index 0 is transparent, covering a band across the middle."""
    image = scene((220, 160), 11).quantize(colors=64)
    indices = np.asarray(image).copy()
    indices[indices == 0] = 1
    indices[60:100, :] = 0
    result = Image.fromarray(indices, "P")
    result.putpalette(image.getpalette())
    return result


def _write_links(dataset: Path, outside: Path) -> list[CorpusFile]:
    secret = outside / "secret.jpg"
    scene((200, 200), 12).save(secret, quality=92)
    (outside / "secret.txt").write_text(SECRET_TEXT)
    os.symlink(secret, dataset / "outside.jpg")
    os.symlink(outside, dataset / "outside folder")
    os.symlink("loop b.jpg", dataset / "loop a.jpg")
    os.symlink("loop a.jpg", dataset / "loop b.jpg")
    (dataset / "nested").mkdir()
    os.symlink("..", dataset / "nested" / "back to top")
    scene((220, 220), 13).save(dataset / "nested" / "inside.jpg", quality=92)
    os.symlink("inside.jpg", dataset / "nested" / "alias.jpg")
    return [
        CorpusFile("outside.jpg", False, "points outside"),
        CorpusFile("outside folder/secret.jpg", False, "points outside"),
        CorpusFile("loop a.jpg", False, "symlink loop", readable=False),
        CorpusFile("loop b.jpg", False, "symlink loop", readable=False),
        CorpusFile("nested/inside.jpg", True, size=(220, 220), reference=as_rgb),
        CorpusFile("nested/alias.jpg", True, size=(220, 220), reference=as_rgb),
    ]
