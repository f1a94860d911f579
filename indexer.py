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

import dataclasses
import hashlib
import itertools
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from errors import IndexingRefused
from image_io import ImageLoadError, find_images
from photo_metadata import PHOTO_FIELDS, PHOTO_METADATA_VERSION, read_photo_fields
from store import batched

if TYPE_CHECKING:
    import numpy as np

    from clip_encoder import ClipEncoder
    from config import Settings
    from loaders import Loaded, LoadedBatch
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
    """What the stat of each file decides; files to read are classified once their hash is known."""

    reads: list[tuple[FileOnDisk, str]] = field(default_factory=list)
    refreshes: list[tuple[str, FileOnDisk]] = field(default_factory=list)
    vanished: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    present_by_hash: dict[str, str] = field(default_factory=dict)


@dataclass
class Copies:
    """Files whose content the index already holds: their stored vectors are reused."""

    moves: list[tuple[FileOnDisk, str]] = field(default_factory=list)
    duplicates: list[tuple[FileOnDisk, str]] = field(default_factory=list)
    touches: list[tuple[str, FileOnDisk]] = field(default_factory=list)
    unmatched: list[FileOnDisk] = field(default_factory=list)


class Indexer:
    """One run of incremental indexing of the dataset folder into the store."""

    def __init__(
        self,
        store: VectorStore,
        encoder: ClipEncoder,
        settings: Settings,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        from loaders import plan_loaders  # torch comes with the encoder; this module stays light

        self.store = store
        self.encoder = encoder
        self.settings = settings
        self.loaders = plan_loaders(settings, encoder.device)
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
        self.progress = IndexProgress("running", len(plan.reads), 0, time.monotonic(), scan_failures)
        self._on_progress(self.progress)
        self._apply_refreshes(plan.refreshes)
        known_hashes = [
            *plan.present_by_hash,
            *(entry[1]["content_hash"] for entry in plan.vanished.values()),
        ]
        already_held = self._encode(plan.reads, known, known_hashes)
        copies = self._classify(already_held, known, plan)
        self._apply_copies(copies.moves, are_moves=True)
        self._apply_copies(copies.duplicates, are_moves=False)
        self._apply_touches(copies.touches)
        if copies.unmatched:
            self.progress.total += len(copies.unmatched)  # read a second time, to be decoded
            self._encode([(file, "") for file in copies.unmatched], known, [])
        self._remove([entry[0] for entry in plan.vanished.values()])
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
        """Unchanged by stat: kept. Everything else is read, and its hash decides (`_classify`).

        A stored vector may be copied only from a file that is not read again in this run (its record
        cannot change meanwhile) or from one that vanished.
        """
        plan = Plan()
        for relative, file in files.items():
            stored = known.get(relative)
            if stored and _same_stat(stored[1], file):
                self.summary.unchanged += 1
                plan.present_by_hash[stored[1]["content_hash"]] = stored[0]
                if not _photo_fields_current(stored[1]):
                    plan.refreshes.append((stored[0], file))
            else:
                plan.reads.append((file, stored[1]["content_hash"] if stored else ""))
        plan.vanished = {path: entry for path, entry in known.items() if path not in files}
        return plan

    def _classify(
        self, files: list[FileOnDisk], known: dict[str, tuple[str, dict[str, Any]]], plan: Plan
    ) -> Copies:
        """Files read but not decoded, as their hash matched one the index holds: what each one is.

        Its own stored hash: only touched. A vanished file's: a move (the first such file), else a
        duplicate of the moved one. An unchanged file's: a duplicate. `unmatched` were matched by the
        hash prefix alone and are encoded after all.
        """
        copies = Copies()
        vanished_by_hash = {entry[1]["content_hash"]: path for path, entry in plan.vanished.items()}
        moved_to: dict[str, str] = {}
        for file in files:
            stored = known.get(file.relative)
            if stored:
                copies.touches.append((stored[0], file))
                self.summary.unchanged += 1
            elif file.content_hash in vanished_by_hash:
                old_path = vanished_by_hash.pop(file.content_hash)
                copies.moves.append((file, plan.vanished.pop(old_path)[0]))
                moved_to[file.content_hash] = image_id(file.relative)
            elif file.content_hash in plan.present_by_hash:
                copies.duplicates.append((file, plan.present_by_hash[file.content_hash]))
            elif file.content_hash in moved_to:
                copies.duplicates.append((file, moved_to[file.content_hash]))
            else:
                copies.unmatched.append(file)
        return copies

    def _apply_copies(self, copies: list[tuple[FileOnDisk, str]], are_moves: bool) -> None:
        """New files given the stored vectors of `(file, source)`; a move also deletes its source."""
        for chunk in batched(copies, self.loaders.batch_size):
            sources = [source for _, source in chunk]
            vectors = self.store.vectors(sources)
            metadatas = []
            for file, source in chunk:
                old = self.store.metadata(source) or {}
                self.summary.refreshed += not _photo_fields_current(old)
                photo = self._photo_facts(file, old)
                metadatas.append(_file_metadata(file, old) | _facts_of(old) | photo | _custom_fields(old))
            self.store.write([image_id(file.relative) for file, _ in chunk], vectors, metadatas)
            if are_moves:
                self.store.delete(sources)
                self.summary.moved += len(chunk)
            else:
                self.summary.added += len(chunk)

    def _apply_touches(self, touches: list[tuple[str, FileOnDisk]]) -> None:
        for chunk in batched(touches, self.loaders.batch_size):
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
        for chunk in batched(refreshes, self.loaders.batch_size):
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
        self,
        reads: list[tuple[FileOnDisk, str]],
        known: dict[str, tuple[str, dict[str, Any]]],
        known_hashes: list[str],
    ) -> list[FileOnDisk]:
        """Read each file once and encode those with new content; each batch is written while the
        model encodes the next one (where the plan says so). The files whose hash the index holds come
        back, with that hash."""
        from device_decode import DeviceDecoder, decodes_on_device
        from loaders import FileLoader, KnownHashes, LoadJob, loaded_batches, with_device_pixels

        encoder = self.encoder
        cpu_loaders = self.loaders.processes or self.loaders.threads
        on_device = decodes_on_device(self.settings, encoder, [file.path for file, _ in reads], cpu_loaders)
        megapixels = self.settings.MAX_IMAGE_MEGAPIXELS
        loader = FileLoader(
            self.root,
            [LoadJob(file.relative, own_hash) for file, own_hash in reads],
            KnownHashes(known_hashes),
            encoder.input_resolution,
            megapixels,
            encoder.preprocess,
            on_device,
        )
        decoder = DeviceDecoder(encoder.device, encoder.input_resolution, megapixels, encoder.preprocess)
        already_held: list[FileOnDisk] = []
        files = iter(file for file, _ in reads)
        with ThreadPoolExecutor(1, thread_name_prefix="writer") as writer:
            writing: Future[None] | None = None
            for loaded in loaded_batches(loader, self.loaders, self.settings.DECODE_MEMORY_MB):
                batch = with_device_pixels(loaded, decoder)
                decoded = self._sort_out(list(itertools.islice(files, len(batch.files))), batch, already_held)
                vectors = encoder.encode_pixels(batch.pixels) if batch.pixels is not None else None
                if writing is not None:
                    writing.result()
                writing = writer.submit(self._store_encoded, decoded, vectors, known, len(batch.files))
                if not self.loaders.overlap_writes:
                    writing.result()
            if writing is not None:
                writing.result()
        return already_held

    def _sort_out(
        self, files: list[FileOnDisk], batch: LoadedBatch, already_held: list[FileOnDisk]
    ) -> list[tuple[FileOnDisk, Loaded]]:
        """The decoded files of a batch, with their hashes; failures recorded, known ones set aside."""
        decoded = []
        for file, loaded in zip(files, batch.files, strict=True):
            hashed = dataclasses.replace(file, content_hash=loaded.content_hash)
            if loaded.error:
                self._fail(file.relative, loaded.error)
            elif loaded.decoded:
                decoded.append((hashed, loaded))
            else:
                already_held.append(hashed)
        return decoded

    def _store_encoded(
        self,
        decoded: list[tuple[FileOnDisk, Loaded]],
        vectors: np.ndarray | None,
        known: dict[str, tuple[str, dict[str, Any]]],
        batch_size: int,
    ) -> None:
        if decoded:
            metadatas = []
            for file, loaded in decoded:
                old = known.get(file.relative, (None, {}))[1]
                metadatas.append(_file_metadata(file, old) | loaded.facts | _custom_fields(old))
            self.store.write([image_id(file.relative) for file, _ in decoded], vectors, metadatas)
            updates = sum(1 for file, _ in decoded if file.relative in known)
            self.summary.encoded += len(decoded)
            self.summary.updated += updates
            self.summary.added += len(decoded) - updates
        self.progress.done += batch_size
        self._on_progress(self.progress)

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
