"""Benchmark 4b: a page's inline thumbnails, made one after the other and side by side.

    python bench/thumbnails.py [--page 10] [--rounds 20]

`POST /search` answers with a thumbnail of each hit inline (`include_images: thumbnail`, the
default); those not cached yet are made from their files. This times one page of them made from the
COCO photos of ../shared/data (640 px JPEGs), one after the other on the request's thread and through
the API's thumbnail pool (`api._thumbnail_pool`), which makes them side by side on the cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import COCO_MINI, markdown_table, median, percentile, report

from api import _thumbnail_pool
from config import Settings
from image_io import thumbnail_jpeg


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page", type=int, default=10, help="thumbnails per page")
    parser.add_argument("--rounds", type=int, default=20)
    return parser.parse_args()


def page_milliseconds(photos: list[Path], side_by_side: bool) -> float:
    settings = Settings()

    def make(photo: Path) -> bytes:
        return thumbnail_jpeg(photo, settings.THUMBNAIL_SIZE, settings.MAX_IMAGE_MEGAPIXELS)

    started = time.perf_counter()
    list(_thumbnail_pool().map(make, photos) if side_by_side else map(make, photos))
    return (time.perf_counter() - started) * 1000


def main() -> None:
    args = parse_args()
    photos = sorted((COCO_MINI / "images").glob("*.jpg"))
    if len(photos) < args.page:
        raise SystemExit(f"needs {args.page} photos in {COCO_MINI / 'images'}")
    pages = [photos[start : start + args.page] for start in range(0, args.rounds * args.page, args.page)]
    pages = [page for page in pages if len(page) == args.page] or [photos[: args.page]]
    timings = {"one after the other": [], "side by side": []}
    for number, page in enumerate(pages):
        ways = list(timings.items())
        for label, times in ways[::-1] if number % 2 else ways:  # either goes first as often
            times.append(page_milliseconds(page, label == "side by side"))
    rows = [[label, len(times), median(times), percentile(times, 95)] for label, times in timings.items()]
    alone = median(timings["one after the other"])
    rows = [[*row, alone / row[2]] for row in rows]
    report(
        "Inline thumbnails of one page",
        [markdown_table(["thumbnails", "pages", "p50 ms", "p95 ms", "speed-up"], rows)],
        [
            f"{args.page} thumbnails per page of 640 px COCO photos, none cached; each page made both ways, "
            "either way first every other page."
        ],
    )


if __name__ == "__main__":
    main()
