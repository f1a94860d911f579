"""The `ImageRetrieval` engine: a CLIP model over a `VectorStore`, and every kind of query.

Front ends (api.py, main.py, embed_images.py, evaluate.py) stay thin over this class: it searches,
indexes, and hands out images and their metadata. The store (store.py) owns Chroma and its mirror,
ranking.py ranks a query's vector, indexer.py brings the store up to date with the dataset folder.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from config import Settings, load_settings
from errors import QueryError, UnknownImage
from explain import DEFAULT_GRID, MAX_GRID, MIN_GRID, Explanation, heat_map
from image_io import ImageLoadError, decode_for_model, open_inside, set_decode_memory
from indexer import SYSTEM_FIELDS, Indexer, IndexSummary, ProgressCallback
from metadata_import import ImportSummary, MetadataLimits, merge_records, normalised_records
from ranking import (
    MODES,
    SORTS,
    Hit,
    QueryPart,
    Ranker,
    SearchQuery,
    SearchResult,
    check_parts,
    no_words_note,
    parsed_filter,
    rankable,
    validated_top_k,
)
from store import VectorStore, lock_database

if TYPE_CHECKING:
    from clip_encoder import ClipEncoder

__all__ = [
    "MODES",
    "SORTS",
    "Hit",
    "ImageRetrieval",
    "QueryError",
    "QueryPart",
    "SearchQuery",
    "SearchResult",
    "UnknownImage",
    "data_uri_bytes",
    "no_words_note",
]

log = logging.getLogger(__name__)


def data_uri_bytes(data_uri: str) -> bytes:
    """The bytes of a `data:<type>;base64,<data>` URI (or of plain base64)."""
    if data_uri.startswith("data:"):
        header, comma, payload = data_uri.partition(",")
        if not comma or not header.endswith(";base64"):
            raise QueryError(
                "a data URI is data:<type>;base64,<data>: this one has no ';base64,' before its data"
            )
    else:
        payload = data_uri
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise QueryError("the image is not valid base64 data") from None


class ImageRetrieval:
    """CLIP + ChromaDB. Opening it loads the model once and mirrors the collection in memory."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        encoder: ClipEncoder | None = None,
        role: str = "engine",
        rebuild: bool = False,
        create: bool = True,
    ) -> None:
        self.settings = settings or load_settings()
        set_decode_memory(self.settings.DECODE_MEMORY_MB)
        self.dataset_root = Path(self.settings.DATASET_FOLDER).resolve()
        lock = lock_database(self.settings, role, create)  # before the model: a busy database fails fast
        try:
            self.encoder = encoder or _load_encoder(self.settings)
            self.store = VectorStore(
                self.settings,
                self.encoder.identity,
                self.encoder.dim,
                lock=lock,
                rebuild=rebuild,
                create=create,
            )
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> ImageRetrieval:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- images and metadata ---------------------------------------------------------------------

    def count(self) -> int:
        return len(self.store)

    def metadata(self, image_id: str) -> dict[str, Any]:
        metadata = self.store.metadata(image_id)
        if metadata is None:
            raise UnknownImage(image_id)
        return metadata

    def images(self) -> list[tuple[str, dict[str, Any]]]:
        """(id, metadata) of every indexed image."""
        return self.store.items()

    def vectors(self, ids: list[str]) -> np.ndarray:
        """The stored vectors of indexed images, one row per id."""
        missing = [image_id for image_id in ids if image_id not in self.store]
        if missing:
            raise UnknownImage(missing[0])
        return self.store.vectors(ids)

    # -- indexing --------------------------------------------------------------------------------

    def index_folder(self, on_progress: ProgressCallback | None = None) -> IndexSummary:
        """Bring the collection up to date with the dataset folder, then apply its metadata files."""
        self.store.check_dataset(self.dataset_root)
        summary = Indexer(self.store, self.encoder, self.settings, on_progress).run()
        for name in self.settings.metadata_file_names:
            metadata_file = self.dataset_root / name
            if metadata_file.is_file():
                summary.metadata_updated += self.import_metadata_file(metadata_file).updated
        return summary

    def import_metadata_file(self, path: Path) -> ImportSummary:
        from metadata_import import read_metadata_file

        return self.import_metadata(read_metadata_file(path, self.metadata_limits))

    @property
    def metadata_limits(self) -> MetadataLimits:
        return MetadataLimits.from_settings(self.settings)

    def import_metadata(self, records: list[dict[str, Any]]) -> ImportSummary:
        """Merge custom metadata (description, tags, any field) into the stored images, no re-encoding.

        Every record is checked first (`MetadataError` names the first bad one); nothing is stored then.
        """
        limits = self.metadata_limits
        records = normalised_records(records, limits, lambda number: f"metadata record {number + 1}")
        summary, changes = merge_records(records, self.store.items(), SYSTEM_FIELDS, limits)
        if changes:
            self.store.update_metadata(list(changes), list(changes.values()))
        return summary

    # -- search ----------------------------------------------------------------------------------

    def search_text(self, text: str, **options: Any) -> SearchResult:
        return self.search(SearchQuery([QueryPart(text=text)], **options))

    def search_image(self, image: bytes | Path, **options: Any) -> SearchResult:
        return self.search(SearchQuery([QueryPart(image=image)], **options))

    def more_like_this(self, image_id: str, **options: Any) -> SearchResult:
        return self.search(SearchQuery([QueryPart(id=image_id)], **options))

    def search(self, query: SearchQuery) -> SearchResult:
        """Check the query, encode it, rank it over one consistent state of the store."""
        top_k = validated_top_k(query, self.settings, self.encoder.dim, self.store)
        self.store.refresh_if_stale()
        view = self.store.view()
        image_filter = parsed_filter(query.filters, self.settings, view.catalog.field_names())
        query, note = rankable(query)
        started = time.perf_counter()
        vector = self.query_vector(query.parts)
        encoded = time.perf_counter()
        result = Ranker(view, self.settings, query, vector, image_filter).result(top_k, note)
        result.timings.update(encode=1000 * (encoded - started), rank=1000 * (time.perf_counter() - encoded))
        return result

    def query_vector(self, parts: list[QueryPart]) -> np.ndarray:
        """The normalised weighted sum of the parts' normalised vectors."""
        texts = [part for part in parts if part.text is not None]
        vectors: list[tuple[float, np.ndarray]] = []
        if texts:
            encoded = self.encoder.encode_texts([part.text for part in texts])
            vectors += [(part.weight, vector) for part, vector in zip(texts, encoded, strict=True)]
        for part in parts:
            if part.image is not None:
                vectors.append((part.weight, self._image_vector(part.image)))
            elif part.id is not None:
                stored = self.store.vector(part.id)
                if stored is None:
                    raise UnknownImage(part.id)
                vectors.append((part.weight, stored))
            elif part.vector is not None:
                given = np.asarray(part.vector, dtype=np.float32)
                vectors.append((part.weight, given / max(float(np.linalg.norm(given)), 1e-12)))
        combined = sum(weight * vector for weight, vector in vectors)
        norm = float(np.linalg.norm(combined))
        if not np.isfinite(norm) or norm < 1e-6:
            raise QueryError("the query parts cancel each other out")
        return (combined / norm).astype(np.float32)

    def _image_vector(self, image: bytes | Path) -> np.ndarray:
        try:
            decoded, _ = decode_for_model(
                image, self.encoder.input_resolution, self.settings.MAX_IMAGE_MEGAPIXELS
            )
        except ImageLoadError as error:
            raise QueryError(f"the query image cannot be used: {error}") from None
        except FileNotFoundError:
            raise QueryError(f"no such image file: {image}") from None
        return self.encoder.encode_images([decoded])[0]

    # -- explaining ------------------------------------------------------------------------------

    def explain(self, image_id: str, parts: list[QueryPart], grid: int = DEFAULT_GRID) -> Explanation:
        """Where the indexed image `image_id` matches the query: a heat map over a grid of cells."""
        if not isinstance(grid, int) or isinstance(grid, bool) or not MIN_GRID <= grid <= MAX_GRID:
            raise QueryError(f"grid must be a whole number from {MIN_GRID} to {MAX_GRID}")
        check_parts(parts, self.settings, self.encoder.dim, self.store)
        self.store.refresh_if_stale()
        vector = self.query_vector(parts)
        path = self.image_path(image_id)
        try:
            image, _ = decode_for_model(
                path, 2 * self.encoder.input_resolution, self.settings.MAX_IMAGE_MEGAPIXELS
            )
        except (ImageLoadError, OSError):
            log.warning("cannot explain %s: its file is unreadable", path)
            raise UnknownImage(image_id) from None
        return heat_map(self.encoder, image, vector, grid)

    # -- files -----------------------------------------------------------------------------------

    def open_file(
        self, image_id: str, metadata: dict[str, Any] | None = None
    ) -> tuple[BinaryIO, os.stat_result]:
        """The file of an indexed image, opened once and checked as opened (see `image_io.open_inside`);
        `metadata` is the image's where the caller has read it already."""
        metadata = metadata or self.store.metadata(image_id)
        if metadata is None:
            raise UnknownImage(image_id)
        try:
            return open_inside(self.dataset_root, metadata["path"])
        except OSError as error:
            log.warning("not serving %s: %s", metadata["path"], error.strerror or error)
            raise UnknownImage(image_id) from None

    def image_path(self, image_id: str) -> Path:
        """The file of an indexed image, guaranteed to lie inside the dataset folder."""
        metadata = self.store.metadata(image_id)
        if metadata is None:
            raise UnknownImage(image_id)
        try:
            path = (self.dataset_root / metadata["path"]).resolve()
        except (OSError, RuntimeError):  # a symlink loop
            raise UnknownImage(image_id) from None
        if not path.is_relative_to(self.dataset_root) or not path.is_file():
            raise UnknownImage(image_id)
        return path


def _load_encoder(settings: Settings) -> ClipEncoder:
    """The model, imported only here: importing torch is most of a front end's start-up time."""
    from clip_encoder import ClipEncoder

    return ClipEncoder.from_settings(settings)
