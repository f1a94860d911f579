"""Benchmark: the cost of "where it matched" (ImageRetrieval.explain) on the CPU, by grid size.

    python bench/explain_cost.py [--images 4] [--repeats 5] [--grids 4 6 8]

Indexes a few photos (coco_mini, or generated ones) with the ViT-B/32 architecture (random weights, as
fast as the trained model), then times explain() for a text query on each photo: the windows of the
grid and the whole image go through the image encoder in one batch. For scale, the same run times the
encoding of one image (decode + preprocess + image transformer), i.e. what an image search costs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import COCO_MINI, markdown_table, median, report, vit_b32_checkpoint

from config import Settings
from explain import windows
from image_retrieval import ImageRetrieval, QueryPart


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--grids", type=int, nargs="+", default=[4, 6, 8])
    return parser.parse_args()


def photo_folder(tmp: Path, count: int) -> Path:
    folder = tmp / "photos"
    folder.mkdir()
    if (COCO_MINI / "images").is_dir():
        for source in sorted((COCO_MINI / "images").glob("*.jpg"))[:count]:
            (folder / source.name).write_bytes(source.read_bytes())
        return folder
    from data_factory import generated_captioned_images

    return generated_captioned_images(folder, count)


def timed_ms(action) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        folder = photo_folder(tmp, args.images)
        settings = Settings(
            DATASET_FOLDER=str(folder),
            CHROMA_DB_PATH=str(tmp / "db"),
            MODEL_NAME=str(vit_b32_checkpoint()),
            DEVICE="cpu",
        )
        with ImageRetrieval(settings) as engine:
            engine.index_folder()
            ids = [image_id for image_id, _ in engine.images()][: args.images]
            paths = [engine.image_path(image_id) for image_id in ids]
            query = [QueryPart(text="a dog on a beach")]
            engine.explain(ids[0], query, grid=2)
            encode = [timed_ms(lambda p=p: engine.query_vector([QueryPart(image=p)])) for p in paths * 2]
            rows = []
            for grid in args.grids:
                times = [
                    timed_ms(lambda i=i, g=grid: engine.explain(i, query, grid=g))
                    for _ in range(args.repeats)
                    for i in ids
                ]
                rows.append(
                    [grid, len(windows(grid)) + 1, len(times), median(times), median(times) / median(encode)]
                )
    table = markdown_table(
        ["grid", "images in the batch", "n", "explain p50 ms", "x one image encoding"], rows
    )
    notes = [
        f"One image encoding (decode + preprocess + image transformer, as an image search does): p50 "
        f"{median(encode):.1f} ms over {len(encode)}. explain() also encodes the text query and decodes "
        "the photo; the API's default grid is 6.",
    ]
    report("Where it matched: POST /explain cost on the CPU", [table], notes, "ViT-B/32 architecture")


if __name__ == "__main__":
    main()
