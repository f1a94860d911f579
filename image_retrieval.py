"""The `ImageRetrieval` engine: a CLIP model over a ChromaDB collection, and every kind of query.

Front ends (api.py, main.py, embed_images.py) stay thin over this class.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from catalog import Catalog
from config import Settings, load_settings
from explain import DEFAULT_GRID, MAX_GRID, MIN_GRID, Explanation, heat_map
from filters import Filter, FilterLimits, check_fields, parse_filter
from image_io import ImageLoadError, decode_for_model, open_inside, set_decode_memory
from indexer import SYSTEM_FIELDS, Indexer, IndexingRefused, IndexSummary, ProgressCallback
from metadata_import import ImportSummary, MetadataLimits, merge_records, normalised_records
from store import (
    DatabaseLock,
    StoreError,
    batched,
    hnsw_configuration,
    new_stamp,
    open_client,
    translated_errors,
)

if TYPE_CHECKING:
    from clip_encoder import ClipEncoder

log = logging.getLogger(__name__)

MODES = ("vector", "keyword", "hybrid")
# relevance: best match first; taken / -taken: the matching images by date taken, oldest / newest
# first, images without a date last.
SORTS = ("relevance", "taken", "-taken")
MIN_CANDIDATES = 100
# Candidates compared at once by near-duplicate folding; up to FULL_FOLD_MAX candidates are all folded
# (for an exact total), more only until the page is full.
COLLAPSE_BLOCK = 256
FULL_FOLD_MAX = 5000
# Fields a filter may always name, even before any image has them.
FILTER_FIELDS = frozenset({"tags", "description"})
STALE_CHECK_SECONDS = 1.0


class QueryError(ValueError):
    """A query that cannot be answered as given; the message says what to change."""


class UnknownImage(KeyError):
    """An id that is not in the index."""

    def __str__(self) -> str:
        return f"no indexed image has id {self.args[0]!r}"


class ModelMismatch(StoreError):
    """The collection was built with another model than the configured one."""


@dataclass
class QueryPart:
    """One part of a query: a text, an image (bytes or a file path), an indexed image's id, or a vector."""

    text: str | None = None
    image: bytes | Path | None = None
    id: str | None = None
    vector: np.ndarray | None = None
    weight: float = 1.0


@dataclass
class SearchQuery:
    parts: list[QueryPart]
    top_k: int | None = None
    offset: int = 0
    min_score: float | None = None
    cutoff: str | None = None
    filters: str | dict[str, Any] | Filter | None = None
    mode: str = "vector"
    collapse_duplicates: bool = True
    sort: str = "relevance"


@dataclass
class Hit:
    id: str
    path: str
    score: float
    rank: int
    metadata: dict[str, Any]
    vector_rank: int | None = None
    keyword_rank: int | None = None
    keyword_score: float | None = None
    matched_terms: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    fused_score: float | None = None

    def as_dict(self, with_why: bool = False) -> dict[str, Any]:
        result = {
            "id": self.id,
            "path": self.path,
            "score": round(self.score, 6),
            "rank": self.rank,
            "metadata": self.metadata,
            "duplicates": self.duplicates,
        }
        if with_why:
            result["why"] = {
                "vector_rank": self.vector_rank,
                "vector_score": round(self.score, 6),
                "keyword_rank": self.keyword_rank,
                "keyword_score": None if self.keyword_score is None else round(self.keyword_score, 6),
                "matched_terms": self.matched_terms,
                "fused_score": None if self.fused_score is None else round(self.fused_score, 6),
            }
        return result


@dataclass
class SearchResult:
    hits: list[Hit]
    mode: str
    has_more: bool
    filtered_total: int | None = None
    note: str | None = None
    total: int | None = None
    total_exact: bool = False

    def hit_dicts(self) -> list[dict[str, Any]]:
        """The hits as JSON-ready objects; keyword and hybrid hits say why they matched."""
        return [hit.as_dict(with_why=self.mode != "vector") for hit in self.hits]


@dataclass
class _Candidate:
    id: str
    score: float
    vector_rank: int | None = None
    keyword_rank: int | None = None
    keyword_score: float | None = None
    matched_terms: tuple[str, ...] = ()
    fused: float | None = None
    duplicates: list[str] = field(default_factory=list)


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
        self._db_lock: DatabaseLock | None = None
        if not self.settings.server_mode:
            db_path = Path(self.settings.CHROMA_DB_PATH)
            if not create and not db_path.is_dir():
                raise StoreError(
                    f"no index at {self.settings.CHROMA_DB_PATH}: run `python embed_images.py` first"
                )
            self._db_lock = DatabaseLock(db_path, role)
            self._db_lock.acquire()
        try:
            self.encoder = encoder or _load_encoder(self.settings)
            self.client = open_client(self.settings)
            with translated_errors(self.settings):
                self.collection = self._open_collection(rebuild, create)
                self.catalog = self._load_catalog()
        except BaseException:
            self.close()
            raise
        self._write_lock = threading.Lock()
        self._last_stale_check = time.monotonic()

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        if self._db_lock is not None:
            self._db_lock.release()
            self._db_lock = None

    def __enter__(self) -> ImageRetrieval:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def db_lock(self) -> DatabaseLock | None:
        return self._db_lock

    def count(self) -> int:
        return len(self.catalog)

    def _open_collection(self, rebuild: bool, create: bool) -> Any:
        name = self.settings.COLLECTION_NAME
        existing = {collection.name for collection in self.client.list_collections()}
        if rebuild and name in existing:
            log.warning("--rebuild: deleting collection %s", name)
            self.client.delete_collection(name)
            existing.discard(name)
        if name not in existing:
            if not create:
                raise StoreError(f"no collection {name!r} yet: run `python embed_images.py` first")
            return self.client.create_collection(
                name,
                embedding_function=None,
                configuration=hnsw_configuration(self.settings),
                metadata=self._collection_stamp(),
            )
        collection = self.client.get_collection(name, embedding_function=None)
        self._apply_ef_search(collection)
        recorded = (collection.metadata or {}).get("model")
        if recorded and recorded != self.encoder.identity and collection.count() > 0:
            raise ModelMismatch(
                f"collection {name!r} was built with model {recorded!r} "
                f"({(collection.metadata or {}).get('dim')}-d), but the configured model is "
                f"{self.encoder.identity!r}: set MODEL_NAME to the collection's model, choose another "
                "COLLECTION_NAME, or run `python embed_images.py --rebuild` to re-index everything"
            )
        return collection

    def _apply_ef_search(self, collection: Any) -> None:
        """HNSW_EF_SEARCH is a query-time setting: bring an existing collection in line with it."""
        current = (collection.configuration or {}).get("hnsw") or {}
        if current.get("ef_search") not in (None, self.settings.HNSW_EF_SEARCH):
            log.info(
                "collection %s: ef_search %s -> %s",
                collection.name,
                current["ef_search"],
                self.settings.HNSW_EF_SEARCH,
            )
            collection.modify(configuration={"hnsw": {"ef_search": self.settings.HNSW_EF_SEARCH}})

    def _collection_stamp(self, stamp: str | None = None) -> dict[str, Any]:
        return {
            "model": self.encoder.identity,
            "dim": self.encoder.dim,
            "dataset": str(self.dataset_root),
            "stamp": stamp or new_stamp(),
        }

    def _load_catalog(self) -> Catalog:
        catalog = Catalog(self.encoder.dim)
        page = self.client.get_max_batch_size()
        offset = 0
        while True:
            records = self.collection.get(include=["embeddings", "metadatas"], limit=page, offset=offset)
            if not records["ids"]:
                break
            catalog.put(
                list(records["ids"]),
                np.asarray(records["embeddings"], dtype=np.float32),
                list(records["metadatas"]),
                keywords=False,
            )
            offset += len(records["ids"])
        catalog.keywords.build_in_background(catalog.items())
        self._stamp = (self.collection.metadata or {}).get("stamp", "")
        log.info("collection %s: %d images", self.settings.COLLECTION_NAME, len(catalog))
        return catalog

    def check_store(self) -> None:
        """Raise `StoreUnavailable` when the Chroma server does not answer now; refresh the mirror."""
        if self.settings.server_mode:
            with translated_errors(self.settings):
                self.client.heartbeat()
        self.refresh_if_stale()

    def refresh_if_stale(self, force: bool = False) -> None:
        """Reload the mirror when another process wrote to the collection (server mode)."""
        if not self.settings.server_mode:
            return
        now = time.monotonic()
        if not force and now - self._last_stale_check < STALE_CHECK_SECONDS:
            return
        self._last_stale_check = now
        with translated_errors(self.settings):
            collection = self.client.get_collection(self.settings.COLLECTION_NAME, embedding_function=None)
            if (collection.metadata or {}).get("stamp", "") != self._stamp:
                self.collection = collection
                self.catalog = self._load_catalog()

    # -- writing ---------------------------------------------------------------------------------

    def write(self, ids: list[str], vectors: np.ndarray, metadatas: list[dict[str, Any]]) -> None:
        """Store vectors and metadata (insert or replace), in the collection and the mirror."""
        with self._write_lock, translated_errors(self.settings):
            stored = self._replacing(ids, metadatas)
            for chunk in batched(list(range(len(ids))), self.client.get_max_batch_size()):
                self.collection.upsert(
                    ids=[ids[i] for i in chunk],
                    embeddings=np.asarray(vectors[chunk], dtype=np.float32),
                    metadatas=[stored[i] for i in chunk],
                )
            self.catalog.put(ids, np.asarray(vectors, dtype=np.float32), metadatas)
            self._bump_stamp()

    def update_metadata(self, ids: list[str], metadatas: list[dict[str, Any]]) -> None:
        with self._write_lock, translated_errors(self.settings):
            stored = self._replacing(ids, metadatas)
            for chunk in batched(list(range(len(ids))), self.client.get_max_batch_size()):
                self.collection.update(ids=[ids[i] for i in chunk], metadatas=[stored[i] for i in chunk])
            self.catalog.update_metadata(ids, metadatas)
            self._bump_stamp()

    def _replacing(self, ids: list[str], metadatas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Chroma metadata that replaces the stored one: Chroma merges, so a field the image had and has
        no more (a GPS position gone from an edited photo) is sent as None, which deletes it."""
        replacing = []
        for image_id, metadata in zip(ids, metadatas, strict=True):
            storable = _storable(metadata)
            before = self.catalog.metadata(image_id) or {}
            replacing.append(storable | {key: None for key in before if key not in storable})
        return replacing

    def delete(self, ids: list[str]) -> None:
        if not ids:
            return
        with self._write_lock, translated_errors(self.settings):
            for chunk in batched(ids, self.client.get_max_batch_size()):
                self.collection.delete(ids=chunk)
            self.catalog.remove(ids)
            self._bump_stamp()

    def _bump_stamp(self) -> None:
        if self.settings.server_mode:
            current = self.client.get_collection(self.settings.COLLECTION_NAME, embedding_function=None)
            if (current.metadata or {}).get("stamp", "") != self._stamp:
                self._last_stale_check = 0.0
                self._stamp = "reload"
                self.collection.modify(metadata=self._collection_stamp())
                return
        self._stamp = new_stamp()
        self.collection.modify(metadata=self._collection_stamp(self._stamp))

    # -- indexing --------------------------------------------------------------------------------

    def index_folder(self, on_progress: ProgressCallback | None = None) -> IndexSummary:
        """Bring the collection up to date with the dataset folder, then apply its metadata files."""
        self._check_dataset_folder()
        summary = Indexer(self, on_progress).run()
        for name in self.settings.metadata_file_names:
            metadata_file = self.dataset_root / name
            if metadata_file.is_file():
                summary.metadata_updated += self.import_metadata_file(metadata_file).updated
        return summary

    def _check_dataset_folder(self) -> None:
        if not self.dataset_root.is_dir():
            raise IndexingRefused(f"the dataset folder {self.settings.DATASET_FOLDER} does not exist")
        recorded = (self.collection.metadata or {}).get("dataset")
        if recorded and recorded != str(self.dataset_root) and self.count() > 0:
            raise IndexingRefused(
                f"collection {self.settings.COLLECTION_NAME!r} indexes {recorded}, not "
                f"{self.dataset_root}: choose another COLLECTION_NAME or CHROMA_DB_PATH, or run with "
                "--rebuild to re-index from the new folder"
            )

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
        summary, changes = merge_records(records, self.catalog.items(), SYSTEM_FIELDS, limits)
        if changes:
            self.update_metadata(list(changes), list(changes.values()))
        return summary

    # -- search ----------------------------------------------------------------------------------

    def search_text(self, text: str, **options: Any) -> SearchResult:
        return self.search(SearchQuery([QueryPart(text=text)], **options))

    def search_image(self, image: bytes | Path, **options: Any) -> SearchResult:
        return self.search(SearchQuery([QueryPart(image=image)], **options))

    def more_like_this(self, image_id: str, **options: Any) -> SearchResult:
        return self.search(SearchQuery([QueryPart(id=image_id)], **options))

    def search(self, query: SearchQuery) -> SearchResult:
        top_k = self._validate(query)
        self.refresh_if_stale()
        image_filter = self._filter(query.filters)
        exclude = frozenset(part.id for part in query.parts if part.id is not None)
        keyword_text = " ".join(part.text for part in query.parts if part.text and part.weight > 0)
        note = None
        if query.mode != "vector" and not keyword_text.strip():
            note = no_words_note(query.mode)
            query = dataclasses.replace(query, mode="vector")
        vector = self.query_vector(query.parts)
        mask = self.catalog.mask(image_filter) if image_filter else None
        need = query.offset + top_k
        if query.sort == "relevance":
            ranked, exhausted = self._ranked_by_relevance(query, vector, keyword_text, mask, exclude, need)
        else:
            ranked = self._ranked_by_date(query, vector, keyword_text, mask, exclude, need)
            exhausted = not query.collapse_duplicates  # else only the first pages are collapsed
        page = [candidate for candidate in ranked[query.offset : need] if candidate.id in self.catalog]
        hits = [self._hit(candidate, query.offset + i + 1) for i, candidate in enumerate(page)]
        filtered_total = int(mask.sum()) if mask is not None else None
        total, exact = self._total(query, ranked, exhausted, filtered_total, exclude)
        return SearchResult(hits, query.mode, len(ranked) > need, filtered_total, note, total, exact)

    def _ranked_by_relevance(
        self,
        query: SearchQuery,
        vector: np.ndarray,
        keyword_text: str,
        mask: np.ndarray | None,
        exclude: frozenset[str],
        need: int,
    ) -> tuple[list[_Candidate], bool]:
        """The best matches (at least `need` + 1 when there are that many), and whether that is all."""
        fetch = max(self._candidate_pool(query), 3 * need)
        while True:
            candidates, exhausted = self._candidates(query.mode, vector, keyword_text, mask, exclude, fetch)
            fold_all = exhausted and len(candidates) <= FULL_FOLD_MAX  # then the total is exact
            ranked = self._refine(candidates, query, vector, need=None if fold_all else need)
            if len(ranked) > need or exhausted:
                return ranked, exhausted and (fold_all or not query.collapse_duplicates)
            fetch *= 4

    def _ranked_by_date(
        self,
        query: SearchQuery,
        vector: np.ndarray,
        keyword_text: str,
        mask: np.ndarray | None,
        exclude: frozenset[str],
        need: int,
    ) -> list[_Candidate]:
        """Every match (filter, keyword match, min_score and cutoff applied) by date taken, undated last."""
        candidates = self._all_candidates(query.mode, vector, keyword_text, mask, exclude)
        matching = self._refine(candidates, query, vector, collapse=False)
        taken = self.catalog.values([candidate.id for candidate in matching], "taken")
        sign = -1.0 if query.sort.startswith("-") else 1.0
        order = sorted(
            range(len(matching)),
            key=lambda i: (0, sign * taken[i]) if isinstance(taken[i], (int, float)) else (1, 0.0),
        )
        ordered = [matching[i] for i in order]
        return self._collapse(ordered, need, query.offset) if query.collapse_duplicates else ordered

    def _all_candidates(
        self,
        mode: str,
        vector: np.ndarray,
        keyword_text: str,
        mask: np.ndarray | None,
        exclude: frozenset[str],
    ) -> list[_Candidate]:
        """Every candidate of the mode, best first, by exact cosine (no graph query of the whole index)."""
        keyword = self._keyword_candidates(vector, keyword_text, mask, exclude) if mode != "vector" else []
        if mode == "keyword":
            return keyword
        rows = mask if mask is not None else self.catalog.mask(None)
        scored = self.catalog.exact_top(vector, rows, max(self.count(), 1), exclude)
        ranked = [
            _Candidate(image_id, score, vector_rank=rank) for rank, (image_id, score) in enumerate(scored, 1)
        ]
        return ranked if mode == "vector" else _fuse(ranked, keyword, self.settings.HYBRID_RRF_K)

    def _filter(self, spec: Any) -> Filter | None:
        """The parsed filter, checked against the fields the indexed images have."""
        from filters import FilterError

        limits = FilterLimits(self.settings.MAX_FILTER_CHARS, self.settings.MAX_FILTER_VALUES)
        try:
            image_filter = parse_filter(spec, limits)
            if image_filter is not None and self.count() > 0:
                check_fields(image_filter, self.catalog.field_names() | SYSTEM_FIELDS | FILTER_FIELDS)
        except FilterError as error:
            raise QueryError(str(error)) from None
        return image_filter

    def _total(
        self,
        query: SearchQuery,
        ranked: list[_Candidate],
        exhausted: bool,
        filtered_total: int | None,
        exclude: frozenset[str],
    ) -> tuple[int | None, bool]:
        """How many results the query has in all: exact when every candidate was ranked, else an
        estimate where the vector ranking keeps every selected image (no score cut), else unknown."""
        if exhausted:
            return len(ranked), True
        if query.mode == "vector" and query.min_score is None and query.cutoff != "adaptive":
            selected = self.count() if filtered_total is None else filtered_total
            return max(len(ranked), selected - len(exclude)), False
        return None, False

    @staticmethod
    def _candidate_pool(query: SearchQuery) -> int:
        """How many candidates a query starts with: the adaptive cutoff and rank fusion need a pool."""
        if query.cutoff == "adaptive" or query.mode != "vector":
            return MIN_CANDIDATES
        return 0

    def _validate(self, query: SearchQuery) -> int:
        settings = self.settings
        top_k = settings.TOP_K if query.top_k is None else query.top_k
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= settings.MAX_TOP_K:
            raise QueryError(f"top_k must be a whole number from 1 to {settings.MAX_TOP_K}")
        if not isinstance(query.offset, int) or not 0 <= query.offset <= settings.MAX_OFFSET:
            raise QueryError(f"offset must be a whole number from 0 to {settings.MAX_OFFSET}")
        if query.mode not in MODES:
            raise QueryError(f"mode must be one of {', '.join(MODES)}")
        if query.sort not in SORTS:
            raise QueryError(f"sort must be one of {', '.join(SORTS)}")
        if query.cutoff not in (None, "none", "adaptive"):
            raise QueryError("cutoff must be 'adaptive' or 'none'")
        if query.min_score is not None and not -1.0 <= query.min_score <= 1.0:
            raise QueryError("min_score must be a number from -1 to 1")
        if not query.parts:
            raise QueryError("the query is empty: give a text, an image or the id of an indexed image")
        if len(query.parts) > settings.MAX_QUERY_PARTS:
            raise QueryError(f"a query has at most {settings.MAX_QUERY_PARTS} parts")
        for part in query.parts:
            given = sum(value is not None for value in (part.text, part.image, part.id, part.vector))
            if given != 1:
                raise QueryError("each query part is exactly one of: text, image, id, vector")
            if part.vector is not None and np.shape(part.vector) != (self.encoder.dim,):
                raise QueryError(f"a query vector has {self.encoder.dim} numbers")
            if not isinstance(part.weight, (int, float)) or not np.isfinite(part.weight):
                raise QueryError("a query part's weight must be a finite number")
            if part.text is not None and not part.text.strip():
                raise QueryError("the text query is empty")
            if part.text is not None and len(part.text) > settings.MAX_QUERY_CHARS:
                raise QueryError(f"the text query is longer than {settings.MAX_QUERY_CHARS} characters")
            if part.id is not None and part.id not in self.catalog:
                raise UnknownImage(part.id)
        return top_k

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
                stored = self.catalog.vector(part.id)
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

    def _candidates(
        self,
        mode: str,
        vector: np.ndarray,
        keyword_text: str,
        mask: np.ndarray | None,
        exclude: frozenset[str],
        fetch: int,
    ) -> tuple[list[_Candidate], bool]:
        """The best `fetch` candidates of the mode, best first, and whether there are no more."""
        if mode == "vector":
            return self._vector_candidates(vector, mask, exclude, fetch)
        keyword = self._keyword_candidates(vector, keyword_text, mask, exclude)
        if mode == "keyword":
            return keyword[:fetch], len(keyword) <= fetch
        ranked, exhausted = self._vector_candidates(vector, mask, exclude, fetch)
        return _fuse(ranked, keyword, self.settings.HYBRID_RRF_K)[:fetch], exhausted and len(keyword) <= fetch

    def _vector_candidates(
        self, vector: np.ndarray, mask: np.ndarray | None, exclude: frozenset[str], fetch: int
    ) -> tuple[list[_Candidate], bool]:
        total = self.count()
        if mask is None:
            scored = self._hnsw(vector, fetch + len(exclude), exclude)
        else:
            selected = int(mask.sum())
            scored = None
            if selected > self.settings.EXACT_SEARCH_MAX:
                scored = self._hnsw_filtered(vector, mask, selected, total, fetch, exclude)
            if scored is None:
                scored = self.catalog.exact_top(vector, mask, fetch, exclude)
            total = selected
        candidates = [
            _Candidate(image_id, score, vector_rank=rank)
            for rank, (image_id, score) in enumerate(scored[:fetch], start=1)
        ]
        return candidates, fetch >= total - len(exclude)

    def _hnsw(self, vector: np.ndarray, count: int, exclude: frozenset[str]) -> list[tuple[str, float]]:
        count = min(count, self.count())
        if count <= 0:
            return []
        with translated_errors(self.settings):
            found = self.collection.query(query_embeddings=[vector], n_results=count, include=[])
        ids = [
            image_id for image_id in found["ids"][0] if image_id in self.catalog and image_id not in exclude
        ]
        scores = self.catalog.scores(ids, vector)
        order = np.lexsort((np.arange(len(ids)), -scores))
        return [(ids[i], float(scores[i])) for i in order]

    def _hnsw_filtered(
        self,
        vector: np.ndarray,
        mask: np.ndarray,
        selected: int,
        total: int,
        fetch: int,
        exclude: frozenset[str],
    ) -> list[tuple[str, float]] | None:
        """A broad filter: over-fetch from the graph and keep matches; None if too few came back."""
        count = min(total, int(fetch * total / selected * 2) + 50 + len(exclude))
        found = self._hnsw(vector, count, exclude)
        keep = self.catalog.selected([image_id for image_id, _ in found], mask)
        scored = [item for item, kept in zip(found, keep, strict=True) if kept]
        return scored if len(scored) >= min(fetch, selected - len(exclude)) else None

    def _keyword_candidates(
        self, vector: np.ndarray, text: str, mask: np.ndarray | None, exclude: frozenset[str]
    ) -> list[_Candidate]:
        hits = [hit for hit in self.catalog.keywords.search(text) if hit.id not in exclude]
        if mask is not None:
            keep = self.catalog.selected([hit.id for hit in hits], mask)
            hits = [hit for hit, kept in zip(hits, keep, strict=True) if kept]
        scores = self.catalog.scores([hit.id for hit in hits], vector)
        return [
            _Candidate(
                hit.id,
                float(score),
                keyword_rank=rank,
                keyword_score=hit.score,
                matched_terms=hit.matched_terms,
            )
            for rank, (hit, score) in enumerate(zip(hits, scores, strict=True), start=1)
        ]

    def _refine(
        self,
        candidates: list[_Candidate],
        query: SearchQuery,
        vector: np.ndarray,
        collapse: bool = True,
        need: int | None = None,
    ) -> list[_Candidate]:
        """Relevance cuts and near-duplicate collapse, applied in rank order (so pages stay stable)."""
        if query.min_score is not None:
            candidates = [candidate for candidate in candidates if candidate.score >= query.min_score]
        if query.cutoff == "adaptive" and candidates:
            threshold = adaptive_threshold([candidate.score for candidate in candidates], self.settings)
            candidates = [candidate for candidate in candidates if candidate.score >= threshold]
        if collapse and query.collapse_duplicates and len(candidates) > 1:
            candidates = self._collapse(candidates, need, query.offset)
        return candidates

    def _collapse(
        self, candidates: list[_Candidate], need: int | None = None, offset: int = 0
    ) -> list[_Candidate]:
        """Near-duplicates folded into the best of them, in rank order (so pages stay stable).

        A candidate is kept unless it lies within DUPLICATE_THRESHOLD of a hit kept before it. Candidates
        are compared block by block with the kept hits only, never all pairs: memory is O(block x kept).
        Once `need` + 1 hits are kept (enough for the page and `has_more`), the remaining candidates are
        only matched with the page's hits (from `offset`), to list them as those hits' duplicates.
        """
        for candidate in candidates:
            candidate.duplicates = []
        limit = len(candidates) if need is None else need + 1
        vectors = self.catalog.vectors([candidate.id for candidate in candidates], missing_ok=True)
        kept = _KeptHits(vectors.shape[1], min(limit, len(candidates)), self.settings.DUPLICATE_THRESHOLD)
        position = 0
        while position < len(candidates) and len(kept) < limit:
            block = vectors[position : position + COLLAPSE_BLOCK]
            for index, twin in kept.fold(block, limit - len(kept)):
                if twin is None:
                    kept.rows.append(position + index)
                else:
                    candidates[kept.rows[twin]].duplicates.append(candidates[position + index].id)
            position += min(len(block), kept.scanned)
        page = kept.rows[offset : limit - 1] if need is not None else []
        self._attach_duplicates(
            candidates[position:], vectors[position:], [candidates[i] for i in page], vectors[page]
        )
        return [candidates[i] for i in kept.rows]

    def _attach_duplicates(
        self,
        rest: list[_Candidate],
        rest_vectors: np.ndarray,
        page: list[_Candidate],
        page_vectors: np.ndarray,
    ) -> None:
        """List each remaining candidate under the first page hit it nearly duplicates."""
        if not rest or not page:
            return
        threshold = self.settings.DUPLICATE_THRESHOLD
        for start in range(0, len(rest), COLLAPSE_BLOCK):
            twins = rest_vectors[start : start + COLLAPSE_BLOCK] @ page_vectors.T >= threshold
            for index in np.flatnonzero(twins.any(axis=1)):
                page[int(np.argmax(twins[index]))].duplicates.append(rest[start + index].id)

    def _hit(self, candidate: _Candidate, rank: int) -> Hit:
        metadata = self.catalog.metadata(candidate.id) or {}
        return Hit(
            id=candidate.id,
            path=metadata.get("path", ""),
            score=candidate.score,
            rank=rank,
            metadata=metadata,
            vector_rank=candidate.vector_rank,
            keyword_rank=candidate.keyword_rank,
            keyword_score=candidate.keyword_score,
            matched_terms=list(candidate.matched_terms),
            duplicates=list(candidate.duplicates),
            fused_score=candidate.fused,
        )

    # -- explaining ------------------------------------------------------------------------------

    def explain(self, image_id: str, parts: list[QueryPart], grid: int = DEFAULT_GRID) -> Explanation:
        """Where the indexed image `image_id` matches the query: a heat map over a grid of cells."""
        if not isinstance(grid, int) or isinstance(grid, bool) or not MIN_GRID <= grid <= MAX_GRID:
            raise QueryError(f"grid must be a whole number from {MIN_GRID} to {MAX_GRID}")
        self._validate(SearchQuery(parts))
        self.refresh_if_stale()
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

    def open_file(self, image_id: str) -> tuple[BinaryIO, os.stat_result]:
        """The file of an indexed image, opened once and checked as opened (see `image_io.open_inside`)."""
        metadata = self.catalog.metadata(image_id)
        if metadata is None:
            raise UnknownImage(image_id)
        try:
            return open_inside(self.dataset_root, metadata["path"])
        except OSError as error:
            log.warning("not serving %s: %s", metadata["path"], error.strerror or error)
            raise UnknownImage(image_id) from None

    def image_path(self, image_id: str) -> Path:
        """The file of an indexed image, guaranteed to lie inside the dataset folder."""
        metadata = self.catalog.metadata(image_id)
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


def no_words_note(mode: str) -> str:
    """Why a query without (positive) text was ranked by vector although `mode` was asked for."""
    return f"no text in the query, so it is ranked by vector similarity ({mode} ranking needs words)"


class _KeptHits:
    """The hits kept so far by duplicate folding: their candidate positions and vectors."""

    def __init__(self, dim: int, capacity: int, threshold: float) -> None:
        self.rows: list[int] = []
        self.threshold = threshold
        self.scanned = 0
        self._vectors = np.zeros((capacity, dim), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def fold(self, block: np.ndarray, room: int) -> list[tuple[int, int | None]]:
        """For each vector of the block in order: (its index, the kept hit it duplicates or None).

        Stops after `room` new hits are kept; `scanned` says how many of the block were looked at.
        """
        before = len(self.rows)
        against_kept = block @ self._vectors[:before].T >= self.threshold
        within = block @ block.T >= self.threshold
        new: list[int] = []
        outcome: list[tuple[int, int | None]] = []
        for index in range(len(block)):
            if len(new) >= room:
                break
            earlier = np.flatnonzero(against_kept[index])
            inside = [k for k, local in enumerate(new) if within[index, local]]
            if earlier.size:
                outcome.append((index, int(earlier[0])))
            elif inside:
                outcome.append((index, before + inside[0]))
            else:
                self._vectors[before + len(new)] = block[index]
                new.append(index)
                outcome.append((index, None))
        self.scanned = len(outcome)
        return outcome


def adaptive_threshold(scores: list[float], settings: Settings) -> float:
    """Keep hits within ADAPTIVE_CUTOFF_RATIO of the way from the best score down to the median.

    The pool is the query's first MIN_CANDIDATES candidates, so the rule is per query: a query whose
    best hit stands far above the rest keeps only the hits near it.
    """
    pool = np.asarray(scores[:MIN_CANDIDATES], dtype=np.float64)
    best, median = float(pool.max()), float(np.median(pool))
    return best - settings.ADAPTIVE_CUTOFF_RATIO * (best - median)


def _fuse(vector: list[_Candidate], keyword: list[_Candidate], k: int) -> list[_Candidate]:
    """Reciprocal rank fusion: each list adds 1 / (k + rank); best fused score first."""
    fused: dict[str, _Candidate] = {}
    for candidate in vector:
        fused[candidate.id] = candidate
        candidate.fused = 1.0 / (k + candidate.vector_rank)
    for candidate in keyword:
        entry = fused.setdefault(candidate.id, candidate)
        if entry is not candidate:
            entry.keyword_rank = candidate.keyword_rank
            entry.keyword_score = candidate.keyword_score
            entry.matched_terms = candidate.matched_terms
        entry.fused = (entry.fused or 0.0) + 1.0 / (k + candidate.keyword_rank)
    return sorted(fused.values(), key=lambda candidate: (-candidate.fused, -candidate.score, candidate.id))


def _storable(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata as Chroma stores it: no None values and no empty lists."""
    return {key: value for key, value in metadata.items() if value is not None and value != []}
