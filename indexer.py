"""Incremental indexing of a folder: what changed since the last run, and encoding only that.

A file is unchanged when its size and modification time match the stored ones; otherwise its
content hash decides: same hash, only the stored facts are refreshed; new hash, it is re-encoded.
A record written before the photo fields (photo_metadata.py) existed, or by an older version of them,
gets them read from the file's EXIF block alone: no decoding, no re-encoding.
A new path whose content hash belongs to a file that vanished is a move, and one whose hash belongs
to a file still present is a duplicate: both reuse the stored vector without running the model.
Each batch is written as soon as it is encoded, so an interrupted run loses at most one batch and a
rerun finishes the job; ids derive from paths, so no image is ever stored twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from errors import IndexingRefused
from image_io import ImageLoadError, decode_for_model, file_hash, find_images
from photo_metadata import PHOTO_FIELDS, PHOTO_METADATA_VERSION, photo_fields, read_photo_fields
from store import batched

if TYPE_CHECKING:
    from clip_encoder import ClipEncoder
    from config import Settings
    from store import VectorStore

log = logging.getLogger(__name__)

SYSTEM_FIELDS = frozenset(
    {
        "path",
        "name",
        "folder",
        "width",
        "height",
        "file_size",
        "modified",
        "content_hash",
        "format",
        "indexed",
        "photo_metadata",
        *PHOTO_FIELDS,
    }
)

ProgressCallback = Callable[["IndexProgress"], None]


def image_id(relative_path: str) -> str:
    return hashlib.sha256(relative_path.encode("utf-8")).hexdigest()[:24]


@dataclass
class IndexProgress:
    state: str = "idle"
    total: int = 0
    done: int = 0
    started: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        elapsed = time.monotonic() - self.started if self.started else 0.0
        return self.done / elapsed if elapsed > 0 else 0.0


@dataclass
class IndexSummary:
    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    refreshed: int = 0
    failed: int = 0
    encoded: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    metadata_updated: int = 0

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"added {self.added}, updated {self.updated}, moved {self.moved}, removed {self.removed}, "
            f"unchanged {self.unchanged}, failed {self.failed}; photo metadata refreshed {self.refreshed} "
            f"(not re-encoded); encoded {self.encoded} in "
            f"{self.seconds:.1f} s ({self.images_per_second:.1f} images/s)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "updated": self.updated,
            "moved": self.moved,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "refreshed": self.refreshed,
            "failed": self.failed,
            "encoded": self.encoded,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 3),
            "metadata_updated": self.metadata_updated,
            "failures": [{"path": path, "reason": reason} for path, reason in self.failures],
        }


@dataclass(frozen=True)
class FileOnDisk:
    relative: str
    path: Path
    size: int
    mtime: float
    content_hash: str = ""


@dataclass
class Plan:
    encode: list[tuple[FileOnDisk, bool]] = field(default_factory=list)
    copies: list[tuple[FileOnDisk, str, bool]] = field(default_factory=list)
    touches: list[tuple[str, FileOnDisk]] = field(default_factory=list)
    refreshes: list[tuple[str, FileOnDisk]] = field(default_factory=list)
    removals: list[str] = field(default_factory=list)


class Indexer:
    """One run of incremental indexing of the dataset folder into the store."""

    def __init__(
        self,
        store: VectorStore,
        encoder: ClipEncoder,
        settings: Settings,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self.store = store
        self.encoder = encoder
        self.settings = settings
        self.root = Path(settings.DATASET_FOLDER).resolve()
        self.summary = IndexSummary()
        self.progress = IndexProgress()
        self._on_progress = on_progress or (lambda progress: None)

    def run(self) -> IndexSummary:
        started = time.monotonic()
        files = self._scan()
        known = {meta["path"]: (image_id_, meta) for image_id_, meta in self.store.items()}
        if not files and known:
            raise IndexingRefused(
                f"{self.root} holds no images, but the index has {len(known)}: refusing to remove them "
                "all (is the folder mounted?). Use --rebuild to start an empty index on purpose."
            )
        plan = self._plan(files, known)
        scan_failures = self.progress.failures
        self.progress = IndexProgress("running", len(plan.encode), 0, time.monotonic(), scan_failures)
        self._on_progress(self.progress)
        self._apply_copies(plan.copies)
        self._apply_touches(plan.touches)
        self._apply_refreshes(plan.refreshes)
        self._encode(plan.encode, known)
        self._remove(plan.removals)
        self.summary.seconds = time.monotonic() - started
        self.summary.failures = self.progress.failures
        self.summary.failed = len(self.progress.failures)
        self.progress.state = "done"
        self._on_progress(self.progress)
        return self.summary

    def _scan(self) -> dict[str, FileOnDisk]:
        files: dict[str, FileOnDisk] = {}
        for path in find_images(self.root):
            relative = path.relative_to(self.root).as_posix()
            if not _is_utf8(relative):
                readable = relative.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                self._fail(readable, "the file name is not valid UTF-8: rename the file to index it")
                continue
            try:
                if not path.resolve().is_relative_to(self.root):
                    raise ImageLoadError("points outside the dataset folder")
                stat = path.stat()
            except RuntimeError:  # how Python 3.11's Path.resolve reports a symlink loop
                self._fail(relative, "symlink loop")
                continue
            except (OSError, ImageLoadError) as error:
                self._fail(relative, getattr(error, "strerror", None) or str(error))
                continue
            files[relative] = FileOnDisk(relative, path, stat.st_size, stat.st_mtime)
        return files

    def _plan(self, files: dict[str, FileOnDisk], known: dict[str, tuple[str, dict[str, Any]]]) -> Plan:
        plan = Plan()
        to_hash = []
        for relative, file in files.items():
            stored = known.get(relative)
            if stored and _same_stat(stored[1], file):
                self.summary.unchanged += 1
                if not _photo_fields_current(stored[1]):
                    plan.refreshes.append((stored[0], file))
            else:
                to_hash.append(file)
        hashed = self._hash_all(to_hash)
        vanished = {path: entry for path, entry in known.items() if path not in files}
        vanished_by_hash = {entry[1]["content_hash"]: path for path, entry in vanished.items()}
        present_by_hash = {
            entry[1]["content_hash"]: entry[0] for path, entry in known.items() if path in files
        }
        for file in hashed:
            stored = known.get(file.relative)
            if stored and stored[1]["content_hash"] == file.content_hash:
                plan.touches.append((stored[0], file))
                self.summary.unchanged += 1
            elif stored:
                plan.encode.append((file, True))
            elif file.content_hash in vanished_by_hash:
                old_path = vanished_by_hash.pop(file.content_hash)
                plan.copies.append((file, vanished.pop(old_path)[0], True))
            elif file.content_hash in present_by_hash:
                plan.copies.append((file, present_by_hash[file.content_hash], False))
            else:
                plan.encode.append((file, False))
        plan.removals = [entry[0] for entry in vanished.values()]
        return plan

    def _hash_all(self, files: list[FileOnDisk]) -> list[FileOnDisk]:
        def hashed(file: FileOnDisk) -> FileOnDisk | None:
            try:
                return FileOnDisk(file.relative, file.path, file.size, file.mtime, file_hash(file.path))
            except OSError as error:
                self._fail(file.relative, f"cannot read: {error.strerror}")
                return None

        with ThreadPoolExecutor(self.settings.LOADER_THREADS) as pool:
            return [file for file in pool.map(hashed, files) if file is not None]

    def _apply_copies(self, copies: list[tuple[FileOnDisk, str, bool]]) -> None:
        for chunk in batched(copies, self.settings.BATCH_SIZE):
            sources = [source for _, source, _ in chunk]
            vectors = self.store.vectors(sources)
            metadatas = []
            for file, source, _ in chunk:
                old = self.store.metadata(source) or {}
                self.summary.refreshed += not _photo_fields_current(old)
                photo = self._photo_facts(file, old)
                metadatas.append(_file_metadata(file, old) | _facts_of(old) | photo | _custom_fields(old))
            self.store.write([image_id(file.relative) for file, _, _ in chunk], vectors, metadatas)
            moved = [source for _, source, is_move in chunk if is_move]
            self.store.delete(moved)
            self.summary.moved += len(moved)
            self.summary.added += len(chunk) - len(moved)

    def _apply_touches(self, touches: list[tuple[str, FileOnDisk]]) -> None:
        for chunk in batched(touches, self.settings.BATCH_SIZE):
            ids = [stored_id for stored_id, _ in chunk]
            metadatas = []
            for stored_id, file in chunk:
                old = self.store.metadata(stored_id) or {}
                self.summary.refreshed += not _photo_fields_current(old)
                photo = self._photo_facts(file, old)
                metadatas.append(_without_photo_fields(old) | _file_metadata(file, old) | photo)
            self.store.update_metadata(ids, metadatas)

    def _apply_refreshes(self, refreshes: list[tuple[str, FileOnDisk]]) -> None:
        """Unchanged files whose records lack the current photo fields: read them from EXIF alone."""
        for chunk in batched(refreshes, self.settings.BATCH_SIZE):
            olds = [self.store.metadata(stored_id) or {} for stored_id, _ in chunk]
            with ThreadPoolExecutor(self.settings.LOADER_THREADS) as pool:
                photos = list(pool.map(self._photo_facts, [file for _, file in chunk], olds))
            metadatas = [_without_photo_fields(old) | photo for old, photo in zip(olds, photos, strict=True)]
            self.summary.refreshed += sum(1 for old in olds if not _photo_fields_current(old))
            self.store.update_metadata([stored_id for stored_id, _ in chunk], metadatas)

    def _photo_facts(self, file: FileOnDisk, old: dict[str, Any]) -> dict[str, Any]:
        """The stored photo fields when current, else those read now from the file's EXIF block."""
        if _photo_fields_current(old):
            return {key: old[key] for key in ("photo_metadata", *PHOTO_FIELDS) if key in old}
        return read_photo_fields(file.path) | {"photo_metadata": PHOTO_METADATA_VERSION}

    def _encode(
        self, items: list[tuple[FileOnDisk, bool]], known: dict[str, tuple[str, dict[str, Any]]]
    ) -> None:
        import torch  # with the model already loaded, this costs nothing; the module stays light

        for batch in self._decoded_batches(items):
            good = [
                (file, is_update, pixels, facts)
                for file, is_update, pixels, facts in batch
                if pixels is not None
            ]
            if good:
                vectors = self.encoder.encode_pixels(torch.stack([item[2] for item in good]))
                metadatas = []
                for file, is_update, _, facts in good:
                    old = known.get(file.relative, (None, {}))[1] if is_update else {}
                    metadatas.append(_file_metadata(file, old) | facts | _custom_fields(old))
                self.store.write([image_id(item[0].relative) for item in good], vectors, metadatas)
                self.summary.encoded += len(good)
                self.summary.updated += sum(1 for item in good if item[1])
                self.summary.added += sum(1 for item in good if not item[1])
            self.progress.done += len(batch)
            self._on_progress(self.progress)

    def _decoded_batches(
        self, items: list[tuple[FileOnDisk, bool]]
    ) -> Iterator[list[tuple[FileOnDisk, bool, Any, dict[str, Any]]]]:
        """Batches decoded and preprocessed on loader threads, two batches ahead of the model."""
        batches = iter(batched(items, self.settings.BATCH_SIZE))
        with ThreadPoolExecutor(self.settings.LOADER_THREADS, thread_name_prefix="loader") as pool:
            pending: deque[list[Future]] = deque()

            def submit_next() -> None:
                batch = next(batches, None)
                if batch is not None:
                    pending.append([pool.submit(self._load, file, is_update) for file, is_update in batch])

            submit_next()
            submit_next()
            while pending:
                futures = pending.popleft()
                submit_next()
                yield [future.result() for future in futures]

    def _load(self, file: FileOnDisk, is_update: bool) -> tuple[FileOnDisk, bool, Any, dict[str, Any]]:
        encoder = self.encoder
        try:
            image, facts = decode_for_model(
                file.path, encoder.input_resolution, self.settings.MAX_IMAGE_MEGAPIXELS
            )
            pixels = encoder.preprocess_image(image)
        except ImageLoadError as error:
            self._fail(file.relative, str(error))
            return file, is_update, None, {}
        except Exception as error:  # one bad file never stops the run
            self._fail(file.relative, f"cannot decode: {error}")
            return file, is_update, None, {}
        photo = photo_fields(facts.exif) if facts.exif is not None else {}
        return (
            file,
            is_update,
            pixels,
            {
                "width": facts.width,
                "height": facts.height,
                "format": facts.format,
                "photo_metadata": PHOTO_METADATA_VERSION,
                **photo,
            },
        )

    def _remove(self, ids: list[str]) -> None:
        self.store.delete(ids)
        self.summary.removed += len(ids)

    def _fail(self, relative: str, reason: str) -> None:
        log.warning("skipped %s: %s", relative, reason)
        self.progress.failures.append((relative, reason))


def _is_utf8(name: str) -> bool:
    """Whether a name from the file system is valid UTF-8 (undecodable bytes arrive as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _same_stat(metadata: dict[str, Any], file: FileOnDisk) -> bool:
    return metadata.get("file_size") == file.size and metadata.get("modified") == file.mtime


def _file_metadata(file: FileOnDisk, old: dict[str, Any]) -> dict[str, Any]:
    folder = os.path.dirname(file.relative)
    return {
        "path": file.relative,
        "name": os.path.basename(file.relative),
        "folder": folder,
        "file_size": file.size,
        "modified": file.mtime,
        "content_hash": file.content_hash or old.get("content_hash", ""),
        "indexed": time.time(),
    }


def _facts_of(metadata: dict[str, Any]) -> dict[str, Any]:
    return {key: metadata[key] for key in ("width", "height", "format") if key in metadata}


def _photo_fields_current(metadata: dict[str, Any]) -> bool:
    return metadata.get("photo_metadata") == PHOTO_METADATA_VERSION


def _without_photo_fields(metadata: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metadata.items() if key not in PHOTO_FIELDS}


def _custom_fields(metadata: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metadata.items() if key not in SYSTEM_FIELDS}
