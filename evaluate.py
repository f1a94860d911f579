"""Retrieval quality of the configured model: `python evaluate.py --captions FILE --images DIR`.

Indexes DIR through the engine (into a temporary database unless --db is given), then measures
Recall@1/5/10 in both directions:
- text -> image: every caption is a search query (`engine.search`); a hit is its own image in the top K;
- image -> text: every indexed image's stored vector ranks all captions; a hit is any of its captions
  in the top K.
Every image in DIR is a candidate, so DIR should hold exactly the test split.

Caption files: Flickr-style CSV (`image,caption` header, one row per caption; the Kaggle Flickr30k
`image_name| comment_number| comment` form also works), coco_mini's annotations.json (a list of
objects with `image` and `captions`), or an official COCO captions JSON (`images` + `annotations`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from config import Settings, load_settings
from errors import EngineError, run_front_end

log = logging.getLogger("evaluate")
KS = (1, 5, 10)
TEXT_BATCH = 256
QUERY_BLOCK = 512


class CaptionFileError(EngineError, ValueError):
    """A captions file that cannot be read; the message says why."""


@dataclass
class Evaluation:
    images: int
    captions: int
    text_to_image: dict[int, float]
    image_to_text: dict[int, float]
    chance_text_to_image: dict[int, float]
    chance_image_to_text: dict[int, float]

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "captions": self.captions,
            "text_to_image": {f"R@{k}": value for k, value in self.text_to_image.items()},
            "image_to_text": {f"R@{k}": value for k, value in self.image_to_text.items()},
            "chance_text_to_image": {f"R@{k}": value for k, value in self.chance_text_to_image.items()},
            "chance_image_to_text": {f"R@{k}": value for k, value in self.chance_image_to_text.items()},
        }

    def table(self) -> str:
        lines = [
            f"{self.images} images, {self.captions} captions",
            f"{'':22}" + "".join(f"R@{k:<7}" for k in KS),
        ]
        rows = {
            "text -> image": self.text_to_image,
            "image -> text": self.image_to_text,
            "chance text -> image": self.chance_text_to_image,
            "chance image -> text": self.chance_image_to_text,
        }
        for label, values in rows.items():
            lines.append(f"{label:22}" + "".join(f"{100 * values[k]:<9.1f}" for k in KS))
        return "\n".join(lines)


# -- metrics (pure functions) --------------------------------------------------------------------


def recall_at_k(
    rankings: Sequence[Sequence[Any]], relevant: Sequence[set[Any]], ks: Sequence[int]
) -> dict[int, float]:
    """The fraction of queries with at least one relevant item among their first k results, per k."""
    if len(rankings) != len(relevant):
        raise ValueError("one set of relevant items is needed per ranking")
    if not rankings:
        raise ValueError("no queries to evaluate")
    return {
        k: sum(1 for ranking, wanted in zip(rankings, relevant, strict=True) if wanted & set(ranking[:k]))
        / len(rankings)
        for k in ks
    }


def top_k_rows(queries: np.ndarray, candidates: np.ndarray, k: int) -> list[list[int]]:
    """For each query vector, the indices of the k candidates of highest dot product, best first.

    Ties go to the lower index. Queries are scored in blocks, so memory stays bounded.
    """
    k = min(k, candidates.shape[0])
    ranked = []
    for start in range(0, len(queries), QUERY_BLOCK):
        scores = queries[start : start + QUERY_BLOCK] @ candidates.T
        ranked += np.argsort(-scores, axis=1, kind="stable")[:, :k].tolist()
    return ranked


def chance_recall(relevant_counts: Sequence[int], candidates: int, ks: Sequence[int]) -> dict[int, float]:
    """Expected Recall@k of a random ranking, when query i has relevant_counts[i] relevant candidates."""
    return {
        k: float(
            np.mean(
                [
                    1
                    - math.comb(candidates - count, min(k, candidates))
                    / math.comb(candidates, min(k, candidates))
                    for count in relevant_counts
                ]
            )
        )
        for k in ks
    }


# -- caption files -------------------------------------------------------------------------------


def load_captions(path: Path) -> dict[str, list[str]]:
    """Captions by image file name (relative to the images folder), from any supported format."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise CaptionFileError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise CaptionFileError(f"{path} is not UTF-8 text") from None
    captions = (
        captions_from_json(text, path) if text.lstrip()[:1] in ("[", "{") else captions_from_csv(text, path)
    )
    captions = {image: [c.strip() for c in texts if c and c.strip()] for image, texts in captions.items()}
    captions = {image: texts for image, texts in captions.items() if texts}
    if not captions:
        raise CaptionFileError(f"{path} holds no captions")
    return captions


def captions_from_csv(text: str, path: Path) -> dict[str, list[str]]:
    first_line = text.splitlines()[0] if text.strip() else ""
    delimiter = "|" if "|" in first_line else ","
    rows = csv.DictReader(text.splitlines(), delimiter=delimiter, skipinitialspace=True)
    fields = {name.strip().lower(): name for name in rows.fieldnames or []}
    image_field = fields.get("image") or fields.get("image_name")
    caption_field = fields.get("caption") or fields.get("comment")
    if not image_field or not caption_field:
        raise CaptionFileError(
            f"{path}: a CSV captions file needs a header with columns image and caption "
            f"(found: {', '.join(fields) or 'nothing'})"
        )
    captions: dict[str, list[str]] = {}
    for row in rows:
        image = (row.get(image_field) or "").strip()
        if image:
            captions.setdefault(image, []).append(row.get(caption_field) or "")
    return captions


def captions_from_json(text: str, path: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(text)
    except ValueError as error:
        raise CaptionFileError(f"{path} is not valid JSON: {error}") from None
    if isinstance(data, list):
        return _captions_from_list(data, path)
    if (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and isinstance(data.get("annotations"), list)
    ):
        return _captions_from_official_coco(data, path)
    raise CaptionFileError(
        f"{path}: expected a list of {{image, captions}} objects or a COCO captions file with images "
        "and annotations"
    )


def _captions_from_list(data: list[Any], path: Path) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = {}
    for index, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise CaptionFileError(f"{path}: entry {index} has no image name")
        texts = entry.get("captions", [])
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise CaptionFileError(f"{path}: the captions of entry {index} must be a list of strings")
        captions.setdefault(entry["image"], []).extend(texts)
    return captions


def _captions_from_official_coco(data: dict[str, Any], path: Path) -> dict[str, list[str]]:
    try:
        names = {image["id"]: image["file_name"] for image in data["images"]}
        captions: dict[str, list[str]] = {}
        for annotation in data["annotations"]:
            captions.setdefault(names[annotation["image_id"]], []).append(annotation["caption"])
    except (KeyError, TypeError) as error:
        raise CaptionFileError(f"{path}: not a COCO captions file (missing {error})") from None
    return captions


# -- evaluation through the engine ---------------------------------------------------------------


def indexed_ids(engine: Any, images: list[str]) -> dict[str, str]:
    """The engine's id of each captioned image, matched by relative path, else by unique file name."""
    by_path = {metadata["path"]: image_id for image_id, metadata in engine.images()}
    by_name: dict[str, list[str]] = {}
    for relative, image_id in by_path.items():
        by_name.setdefault(Path(relative).name, []).append(image_id)
    found = {}
    for image in images:
        image_id = by_path.get(image.replace("\\", "/"))
        if image_id is None and len(by_name.get(Path(image).name, [])) == 1:
            image_id = by_name[Path(image).name][0]
        if image_id is not None:
            found[image] = image_id
    return found


def evaluate(
    engine: Any, captions: dict[str, list[str]], ks: Sequence[int] = KS, progress: bool = False
) -> Evaluation:
    from tqdm import tqdm

    from image_retrieval import QueryPart, SearchQuery

    ids = indexed_ids(engine, list(captions))
    missing = len(captions) - len(ids)
    if not ids:
        raise CaptionFileError("none of the captioned images is in the images folder")
    if missing:
        log.warning("%d captioned images are not in the images folder; their captions are skipped", missing)
    pairs = [(ids[image], text) for image in ids for text in captions[image]]
    depth = max(ks)
    rankings = []
    for _, text in tqdm(pairs, desc="text -> image", unit="query", disable=not progress, file=sys.stderr):
        query = SearchQuery([QueryPart(text=text)], top_k=depth, collapse_duplicates=False)
        rankings.append([hit.id for hit in engine.search(query).hits])
    text_to_image = recall_at_k(rankings, [{image_id} for image_id, _ in pairs], ks)

    image_ids = list(dict.fromkeys(image_id for image_id, _ in pairs))
    texts = [text for _, text in pairs]
    text_vectors = np.concatenate(
        [engine.encoder.encode_texts(texts[i : i + TEXT_BATCH]) for i in range(0, len(texts), TEXT_BATCH)]
    )
    owned = {
        image_id: {i for i, (owner, _) in enumerate(pairs) if owner == image_id} for image_id in image_ids
    }
    ranked_captions = top_k_rows(engine.vectors(image_ids), text_vectors, depth)
    image_to_text = recall_at_k(ranked_captions, [owned[image_id] for image_id in image_ids], ks)
    return Evaluation(
        images=len(image_ids),
        captions=len(pairs),
        text_to_image=text_to_image,
        image_to_text=image_to_text,
        chance_text_to_image=chance_recall([1] * len(pairs), engine.count(), ks),
        chance_image_to_text=chance_recall([len(owned[i]) for i in image_ids], len(pairs), ks),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Recall@1/5/10 of text->image and image->text retrieval.")
    parser.add_argument("--captions", type=Path, required=True, help="captions file (CSV or JSON)")
    parser.add_argument("--images", type=Path, required=True, help="folder of the captioned images")
    parser.add_argument("--model", help="CLIP model name or checkpoint path (MODEL_NAME)")
    parser.add_argument("--db", help="database folder to index into (default: a temporary one)")
    parser.add_argument("--device", help="cpu, cuda or auto (DEVICE)")
    parser.add_argument("--batch-size", type=int, help="images per model batch (BATCH_SIZE)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(
        DATASET_FOLDER=str(args.images),
        CHROMA_DB_PATH=args.db,
        MODEL_NAME=args.model,
        DEVICE=args.device,
        BATCH_SIZE=args.batch_size,
    )


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Evaluate into the --db folder, else into a temporary one; print (and save) the table."""
    if args.db:
        result = evaluate_folder(settings, args)
    else:
        with tempfile.TemporaryDirectory(prefix="evaluate-") as db:
            result = evaluate_folder(settings.with_overrides(CHROMA_DB_PATH=db), args)
    print(result.table())
    if args.json:
        args.json.write_text(json.dumps(result.as_dict(), indent=2))
    return 0


def evaluate_folder(settings: Settings, args: argparse.Namespace) -> Evaluation:
    captions = load_captions(args.captions)
    if not args.images.is_dir():
        raise CaptionFileError(f"the images folder {args.images} does not exist")
    from image_retrieval import ImageRetrieval

    with ImageRetrieval(settings, role="evaluate") as engine:
        summary = engine.index_folder()
        log.info("indexed: %s", summary.line())
        return evaluate(engine, captions, KS, progress=not args.quiet)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_front_end(
        lambda: settings_from(args), lambda settings: run(settings, args), log_level=logging.WARNING
    )


if __name__ == "__main__":
    sys.exit(main())
