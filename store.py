"""The store: ChromaDB (embedded or server) and the in-memory mirror of its collection, in step.

`VectorStore` owns both, and these rules between them:

- Chroma is the store of record. The mirror (catalog.py: vectors, metadata, keyword index) is a copy
  that answers what the HNSW graph cannot: filters, exact cosine over a subset, vectors by id.
- Every write (`write`, `update_metadata`, `delete`) happens under one lock, in one order: Chroma
  first, then the mirror, then the collection's stamp (a random token in its metadata). A write that
  Chroma refuses changes nothing else.
- Readers take one `StoreView` (collection, mirror, stamp) and use it for a whole query; they skip ids
  the mirror lacks (an id Chroma's graph returns that was just deleted, or written by another process).
- In server mode other processes write too. A mirror whose stamp differs from the collection's is
  stale: it is rebuilt aside, on a background thread, while searches keep using the old one; the
  writes this process makes meanwhile are replayed onto the new mirror, which is then swapped in with
  one assignment under the write lock, never while a write is half done.
- A process's own write keeps its mirror's stamp current only when the collection still carried that
  stamp just before the write; otherwise another process wrote, the stamp stays old and the mirror is
  rebuilt.

Chroma's embedded client is not built for several processes on one database folder, so an embedded
database is only ever opened by one process at a time: the owner holds an exclusive lock on
`<CHROMA_DB_PATH>/.lock` and writes who it is to `<CHROMA_DB_PATH>/owner.json`. A running API server
is such an owner; `embed_images.py` then hands its work to that server over HTTP instead of opening
the database itself (see embed_images.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from catalog import Catalog, MirrorFolder, lock_exclusively, unlock
from config import Settings
from errors import (
    DamagedStore,
    DatabaseBusy,
    IndexingRefused,
    ModelMismatch,
    StoreError,
    StoreUnavailable,
)
from filters import Filter
from keywords import KeywordHit

if TYPE_CHECKING:
    import chromadb

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
OWNER_FILE = "owner.json"
# How often a server-mode reader asks the collection whether another process wrote to it.
STALE_CHECK_SECONDS = 1.0
# A mirror rebuild of this many images or more shows a progress bar (on a terminal).
PROGRESS_FROM = 50000
DEFAULT_SERVER_MIRROR = "~/.cache/semantic-image-search/mirror"


class DatabaseLock:
    """An exclusive lock on an embedded database folder, held while a process uses it."""

    def __init__(self, folder: Path, role: str, details: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self._file = None
        self.owner = {"pid": os.getpid(), "role": role, **(details or {})}

    def acquire(self) -> None:
        try:
            lock_file = lock_exclusively(self.folder, LOCK_FILE)
        except BlockingIOError:
            owner = read_owner(self.folder)
            raise DatabaseBusy(
                f"the database {self.folder} is in use by another process "
                f"({owner.get('role', 'unknown')}, pid {owner.get('pid', '?')})",
                owner,
            ) from None
        except OSError as error:
            raise StoreError(f"cannot open the database folder {self.folder}: {error.strerror}") from None
        self._file = lock_file
        self.write_owner(self.owner)

    def write_owner(self, owner: dict[str, Any]) -> None:
        self.owner = owner
        (self.folder / OWNER_FILE).write_text(json.dumps(owner))

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                (self.folder / OWNER_FILE).unlink()
            unlock(self._file)
            self._file = None


def read_owner(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return {}


def open_client(settings: Settings) -> chromadb.ClientAPI:
    import chromadb  # only a process that opens the database pays for importing Chroma
    from chromadb.config import Settings as ChromaSettings

    chroma_settings = ChromaSettings(anonymized_telemetry=False, allow_reset=False)
    if settings.server_mode:
        try:
            return chromadb.HttpClient(
                host=settings.CHROMA_HOST, port=settings.CHROMA_PORT, settings=chroma_settings
            )
        except Exception as error:
            raise StoreUnavailable(
                f"cannot reach the Chroma server at {settings.CHROMA_HOST}:{settings.CHROMA_PORT}: {error}"
            ) from None
    try:
        return chromadb.PersistentClient(path=settings.CHROMA_DB_PATH, settings=chroma_settings)
    except Exception as error:
        raise StoreError(f"cannot open the database at {settings.CHROMA_DB_PATH}: {error}") from None


def hnsw_configuration(settings: Settings) -> dict[str, Any]:
    return {
        "hnsw": {
            "space": "cosine",
            "max_neighbors": settings.HNSW_M,
            "ef_construction": settings.HNSW_EF_CONSTRUCTION,
            "ef_search": settings.HNSW_EF_SEARCH,
        }
    }


def new_stamp() -> str:
    return uuid.uuid4().hex


@contextlib.contextmanager
def translated_errors(settings: Settings) -> Iterator[None]:
    """Turn the Chroma client's connection failures into `StoreUnavailable` with a plain message."""
    try:
        yield
    except StoreError:
        raise
    except Exception as error:
        if _is_damage(error):
            raise DamagedStore(damage_message(settings, error)) from None
        if settings.server_mode and _is_connection_error(error):
            raise StoreUnavailable(
                f"the Chroma server at {settings.CHROMA_HOST}:{settings.CHROMA_PORT} is not answering"
            ) from None
        raise


def _is_damage(error: BaseException) -> bool:
    """Chroma's error for a write it accepted and cannot apply, or that error already translated."""
    text = str(error)
    return isinstance(error, DamagedStore) or (
        type(error).__name__ == "InternalError"
        and ("apply logs" in text or "compaction" in text.lower() or "backfill" in text)
    )


def damage_message(settings: Settings, error: Exception) -> str:
    where = (
        f"the collection {settings.COLLECTION_NAME!r} on the Chroma server {settings.CHROMA_HOST}"
        if settings.server_mode
        else f"the database at {settings.CHROMA_DB_PATH}"
    )
    return (
        f"{where} is damaged: Chroma cannot apply a write it accepted earlier ({error}), so nothing can "
        "be read from it or written to it. The way out: run `python embed_images.py --rebuild` to index "
        "the images again (their files are untouched), then import custom metadata again with "
        "`--metadata FILE` (files named in METADATA_FILE_NAMES inside the dataset folder are applied by "
        "themselves)"
    )


def _is_connection_error(error: Exception) -> bool:
    names = {cls.__name__ for cls in type(error).__mro__}
    text = str(error).lower()
    return bool(
        names & {"ConnectError", "ConnectionError", "TimeoutException", "RemoteProtocolError", "ReadError"}
        or "connect" in text
        or "could not connect" in text
    )


def batched(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def mirror_folder(settings: Settings) -> Path:
    """Where this collection's mirror lives (see MIRROR_FOLDER)."""
    if settings.server_mode:
        root = Path(settings.MIRROR_FOLDER or DEFAULT_SERVER_MIRROR).expanduser()
        root /= f"{settings.CHROMA_HOST}-{settings.CHROMA_PORT}"
    else:
        root = Path(settings.MIRROR_FOLDER or Path(settings.CHROMA_DB_PATH) / "mirror").expanduser()
    return root / settings.COLLECTION_NAME


def lock_database(settings: Settings, role: str, create: bool = True) -> DatabaseLock | None:
    """Take the embedded database's lock for this process (None in server mode)."""
    if settings.server_mode:
        return None
    db_path = Path(settings.CHROMA_DB_PATH)
    if not create and not db_path.is_dir():
        raise StoreError(f"no index at {settings.CHROMA_DB_PATH}: run `python embed_images.py` first")
    lock = DatabaseLock(db_path, role)
    lock.acquire()
    return lock


@dataclasses.dataclass(frozen=True)
class StoreView:
    """One consistent state for a reader: the collection, its mirror and the stamp the mirror reflects."""

    collection: Any
    catalog: Catalog
    stamp: str

    def nearest(self, vector: np.ndarray, count: int, settings: Settings) -> list[str]:
        """Up to `count` ids nearest to `vector` by the HNSW graph, best first; ids the mirror lacks are
        skipped."""
        count = min(count, len(self.catalog))
        if count <= 0:
            return []
        with translated_errors(settings):
            found = self.collection.query(query_embeddings=[vector], n_results=count, include=[])
        return [image_id for image_id in found["ids"][0] if image_id in self.catalog]


Change = Callable[[Catalog], None]


class VectorStore:
    """The collection and its mirror, kept in step by the rules in this module's docstring."""

    def __init__(
        self,
        settings: Settings,
        model: str,
        dim: int,
        *,
        lock: DatabaseLock | None = None,
        rebuild: bool = False,
        create: bool = True,
    ) -> None:
        self.settings = settings
        self.model = model
        self.dim = dim
        self.lock = lock
        self._write_lock = threading.Lock()
        self._rebuild_lock = threading.Lock()
        self._rebuilder: threading.Thread | None = None
        self._journal: list[Change] | None = None
        self._last_stale_check = time.monotonic()
        self._server_answered = True
        self._mirror: MirrorFolder | None = None
        self._view: StoreView | None = None
        self._sent = 0
        self._unfinished = False
        try:
            self.client = open_client(settings)
            with translated_errors(settings):
                collection = self._open_collection(rebuild, create)
                self._mirror = MirrorFolder(mirror_folder(settings), dim, settings.FIRST_PASS_MIN)
                self._view = self._reuse_view(collection) or self._read_view(collection)
            self._mirror.make_current(self._view.catalog)
        except BaseException:
            self.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        rebuilder = self._rebuilder
        if rebuilder is not None:
            rebuilder.join()
        if self._view is not None:
            self._view.catalog.close()
            self._view = None
        if self._mirror is not None:
            self._mirror.close()
            self._mirror = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- opening and checking --------------------------------------------------------------------

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
                metadata=self._collection_metadata(new_stamp()),
            )
        collection = self.client.get_collection(name, embedding_function=None)
        self._apply_ef_search(collection)
        recorded = (collection.metadata or {}).get("model")
        if recorded and recorded != self.model and collection.count() > 0:
            raise ModelMismatch(
                f"collection {name!r} was built with model {recorded!r} "
                f"({(collection.metadata or {}).get('dim')}-d), but the configured model is "
                f"{self.model!r}: set MODEL_NAME to the collection's model, choose another "
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

    def _collection_metadata(self, stamp: str) -> dict[str, Any]:
        return {
            "model": self.model,
            "dim": self.dim,
            "dataset": str(Path(self.settings.DATASET_FOLDER).resolve()),
            "stamp": stamp,
        }

    def check_dataset(self, root: Path) -> None:
        """Refuse to index `root` into a collection that indexes another folder."""
        if not root.is_dir():
            raise IndexingRefused(f"the dataset folder {self.settings.DATASET_FOLDER} does not exist")
        recorded = self.recorded().get("dataset")
        if recorded and recorded != str(root) and len(self) > 0:
            raise IndexingRefused(
                f"collection {self.settings.COLLECTION_NAME!r} indexes {recorded}, not "
                f"{root}: choose another COLLECTION_NAME or CHROMA_DB_PATH, or run with "
                "--rebuild to re-index from the new folder"
            )

    def check(self) -> None:
        """Raise `StoreUnavailable` when the Chroma server does not answer now; refresh the mirror."""
        if self.settings.server_mode:
            with translated_errors(self.settings):
                self.client.heartbeat()
        self.refresh_if_stale()

    # -- the mirror ------------------------------------------------------------------------------

    def _reuse_view(self, collection: Any) -> StoreView | None:
        """The mirror on disk, if it reflects the collection as it is now."""
        stamp = (collection.metadata or {}).get("stamp", "")
        # Embedded, every write goes through this module under the database lock and changes the
        # stamp, so a stamp that matches is proof enough. Counting would make Chroma load its whole
        # HNSW graph (2.6 GB and seconds at 1M images) into a process that may never query it.
        count = collection.count() if self.settings.server_mode or not stamp else None
        catalog = self._mirror.open_current(stamp, count)
        if catalog is None:
            return None
        log.info("collection %s: %d images (mirror on disk)", self.settings.COLLECTION_NAME, len(catalog))
        return StoreView(collection, catalog, stamp)

    def _read_view(self, collection: Any) -> StoreView:
        """A new mirror of `collection` (not yet current), with the stamp the collection had before it
        was read."""
        stamp = (collection.metadata or {}).get("stamp", "")
        catalog = self._mirror.new_build()
        page = self.client.get_max_batch_size()
        offset = 0
        total = collection.count()
        with tqdm(
            total=total, unit="img", desc="mirroring", file=sys.stderr, disable=total < PROGRESS_FROM or None
        ) as bar:
            while True:
                records = collection.get(include=["embeddings", "metadatas"], limit=page, offset=offset)
                if not records["ids"]:
                    break
                catalog.put(
                    list(records["ids"]),
                    np.asarray(records["embeddings"], dtype=np.float32),
                    list(records["metadatas"]),
                )
                offset += len(records["ids"])
                bar.update(len(records["ids"]))
        catalog.set_stamp(stamp)
        log.info("collection %s: %d images (mirror rebuilt)", self.settings.COLLECTION_NAME, len(catalog))
        return StoreView(collection, catalog, stamp)

    def _stored_stamp(self) -> str:
        collection = self.client.get_collection(self.settings.COLLECTION_NAME, embedding_function=None)
        return (collection.metadata or {}).get("stamp", "")

    def refresh_if_stale(self, wait: bool = False) -> None:
        """Server mode: when another process wrote to the collection, rebuild the mirror in the
        background (searches keep the old one meanwhile). With `wait`, check now and return once the
        mirror reflects the collection as it was at the call. While the server does not answer, every
        call asks it again and raises StoreUnavailable: no search is answered from a mirror that may
        have fallen behind."""
        if not self.settings.server_mode:
            return
        now = time.monotonic()
        if not wait and self._server_answered and now - self._last_stale_check < STALE_CHECK_SECONDS:
            return
        self._last_stale_check = now
        for _ in range(3):  # a rebuild that was already running may predate the newest write
            self._server_answered = False  # until it does: every search asks again, and fails meanwhile
            with translated_errors(self.settings):
                stored = self._stored_stamp()
            self._server_answered = True
            if stored == self._view.stamp:
                return
            rebuilder = self._start_rebuild()
            if not wait:
                return
            rebuilder.join()

    def _start_rebuild(self) -> threading.Thread:
        """The rebuild thread: the one running, or a new one."""
        with self._rebuild_lock:
            if self._rebuilder is None:
                self._rebuilder = threading.Thread(target=self._rebuild, name="mirror-rebuild", daemon=True)
                self._rebuilder.start()
            return self._rebuilder

    def _rebuild(self) -> None:
        """Read a new mirror aside, replay this process's writes made meanwhile, swap it in."""
        try:
            with self._write_lock:
                self._journal = []
            with translated_errors(self.settings):
                collection = self.client.get_collection(
                    self.settings.COLLECTION_NAME, embedding_function=None
                )
                view = self._read_view(collection)
            with self._write_lock:
                for change in self._journal:
                    change(view.catalog)
                self._mirror.make_current(view.catalog)
                self._view = view
        except Exception as error:
            log.warning("cannot reload the collection, searches keep the previous state: %s", error)
        finally:
            with self._write_lock:
                self._journal = None
            with self._rebuild_lock:
                self._rebuilder = None

    # -- writing ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Any]:
        """One write, under the write lock; yields the collection. The mirror on disk is marked
        unfinished (an empty stamp) until Chroma, the mirror and the collection's stamp are written.
        A write that fails before Chroma took any of it leaves the mark as it was; one that fails later,
        or one that damaged Chroma (it took the write and cannot apply it), leaves the mirror on disk
        marked for a rebuild at the next start, which finds the damage."""
        with self._write_lock, translated_errors(self.settings):
            catalog = self._view.catalog
            before = catalog.stamp()
            self._guarded(lambda: catalog.set_stamp(""))
            self._sent = 0
            try:
                yield self._view.collection
                self._bump_stamp()
            except BaseException as error:
                if self._sent == 0 and not self._unfinished and not _is_damage(error):
                    self._guarded(lambda: catalog.set_stamp(before))
                else:
                    self._unfinished = True
                raise
            if not self._unfinished:
                self._guarded(lambda: self._view.catalog.set_stamp(self._view.stamp))

    def _send(self, call: Callable[..., Any], **arguments: Any) -> None:
        """One call that writes to Chroma, counted (see `_writing`)."""
        call(**arguments)
        self._sent += 1

    def write(self, ids: list[str], vectors: np.ndarray, metadatas: list[dict[str, Any]]) -> None:
        """Store vectors and metadata (insert or replace)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        with self._writing() as collection:
            stored = self._replacing(ids, metadatas)
            for chunk in batched(list(range(len(ids))), self.client.get_max_batch_size()):
                self._send(
                    collection.upsert,
                    ids=[ids[i] for i in chunk],
                    embeddings=vectors[chunk],
                    metadatas=[stored[i] for i in chunk],
                )
            self._apply(lambda catalog: catalog.put(ids, vectors, metadatas))

    def update_metadata(self, ids: list[str], metadatas: list[dict[str, Any]]) -> None:
        """Replace the metadata of stored images (their vectors stay)."""
        with self._writing() as collection:
            stored = self._replacing(ids, metadatas)
            for chunk in batched(list(range(len(ids))), self.client.get_max_batch_size()):
                chunk_ids, chunk_metadatas = [ids[i] for i in chunk], [stored[i] for i in chunk]
                self._send(collection.update, ids=chunk_ids, metadatas=chunk_metadatas)
            self._apply(lambda catalog: catalog.update_metadata(ids, metadatas))

    def delete(self, ids: list[str]) -> None:
        if not ids:
            return
        with self._writing() as collection:
            for chunk in batched(ids, self.client.get_max_batch_size()):
                self._send(collection.delete, ids=chunk)
            self._apply(lambda catalog: catalog.remove(ids))

    def _apply(self, change: Change) -> None:
        """Apply a write to the mirror, and keep it for a mirror being rebuilt."""
        self._guarded(lambda: change(self._view.catalog))
        if self._journal is not None:
            self._journal.append(change)

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run a step that writes the mirror's files; a failure (disk full) is a `StoreError`."""
        try:
            step()
        except (sqlite3.Error, OSError) as error:
            raise StoreError(
                f"cannot write the mirror at {self._view.catalog.folder}: {error} (Chroma holds the "
                "write; the mirror is rebuilt from it at the next start)"
            ) from None

    def _replacing(self, ids: list[str], metadatas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Chroma metadata that replaces the stored one: Chroma merges, so a field the image had and has
        no more (a GPS position gone from an edited photo) is sent as None, which deletes it."""
        catalog = self._view.catalog
        before = {image_id: catalog.metadata(image_id) for image_id in ids}
        unseen = [image_id for image_id, metadata in before.items() if metadata is None]
        if unseen and self.settings.server_mode:  # written by another process since the mirror was read
            for chunk in batched(unseen, self.client.get_max_batch_size()):
                found = self._view.collection.get(ids=chunk, include=["metadatas"])
                before.update(zip(found["ids"], found["metadatas"], strict=True))
        replacing = []
        for image_id, metadata in zip(ids, metadatas, strict=True):
            storable = _storable(metadata)
            old = before[image_id] or {}
            replacing.append(storable | {key: None for key in old if key not in storable})
        return replacing

    def _bump_stamp(self) -> None:
        """Give the collection a new stamp; the mirror takes it only when it was in step before."""
        view = self._view
        in_step = not self.settings.server_mode or self._stored_stamp() == view.stamp
        stamp = new_stamp()
        view.collection.modify(metadata=self._collection_metadata(stamp))
        if in_step:
            self._view = dataclasses.replace(view, stamp=stamp)
        else:
            self._last_stale_check = 0.0

    # -- reading ---------------------------------------------------------------------------------

    def view(self) -> StoreView:
        """The current state, for a reader that needs one consistent state for a whole query."""
        return self._view

    def __len__(self) -> int:
        return len(self._view.catalog)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._view.catalog

    def metadata(self, image_id: str) -> dict[str, Any] | None:
        return self._view.catalog.metadata(image_id)

    def vector(self, image_id: str) -> np.ndarray | None:
        return self._view.catalog.vector(image_id)

    def vectors(self, ids: list[str], missing_ok: bool = False) -> np.ndarray:
        return self._view.catalog.vectors(ids, missing_ok)

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        """(id, metadata) of every image in the mirror."""
        return self._view.catalog.items()

    def mask(self, image_filter: Filter | None) -> np.ndarray:
        return self._view.catalog.mask(image_filter)

    def first_pass(self) -> str:
        return self.view().catalog.first_pass

    def read_recent_fields(self) -> None:
        """Read again the fields the last searches read into columns (a background job at start)."""
        started = time.perf_counter()
        try:
            names = self.view().catalog.read_recent_fields()
        except (sqlite3.Error, OSError, ValueError) as error:  # the mirror closed or replaced meanwhile
            log.info("stopped reading the fields recent searches used: %s", error)
            return
        if names:
            seconds = time.perf_counter() - started
            log.info("read %s, as recent searches did, in %.1f s", ", ".join(names), seconds)

    def field_names(self) -> frozenset[str]:
        return self._view.catalog.field_names()

    def keyword_search(self, text: str, limit: int | None = None) -> list[KeywordHit]:
        return self._view.catalog.keywords.search(text, limit)

    def recorded(self) -> dict[str, Any]:
        """What the collection records about itself: model, dim, dataset folder, stamp."""
        return dict(self._view.collection.metadata or {})

    def stored_count(self) -> int:
        """How many records Chroma itself holds (the mirror's count is `len`)."""
        with translated_errors(self.settings):
            return self._view.collection.count()


def _storable(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata as Chroma stores it: no None values and no empty lists."""
    return {key: value for key, value in metadata.items() if value is not None and value != []}
