"""The ChromaDB side: opening the client (embedded or server), the collection and its records.

Chroma's embedded client is not built for several processes on one database folder, so an embedded
database is only ever opened by one process at a time: the owner holds an exclusive lock on
`<CHROMA_DB_PATH>/.lock` and writes who it is to `<CHROMA_DB_PATH>/owner.json`. A running API server
is such an owner; `embed_images.py` then hands its work to that server over HTTP instead of opening
the database itself (see embed_images.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config import Settings

if TYPE_CHECKING:
    import chromadb

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
OWNER_FILE = "owner.json"


class StoreError(RuntimeError):
    """The database cannot be used as asked; the message says why and what to do."""


class StoreUnavailable(StoreError):
    """The Chroma server cannot be reached (server mode); worth retrying later."""


class DamagedStore(StoreError):
    """Chroma cannot apply a write it has already accepted: nothing more can be read or written."""


class DatabaseBusy(StoreError):
    """Another process owns the embedded database."""

    def __init__(self, message: str, owner: dict[str, Any]) -> None:
        super().__init__(message)
        self.owner = owner


class DatabaseLock:
    """An exclusive lock on an embedded database folder, held while a process uses it."""

    def __init__(self, folder: Path, role: str, details: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self._file = None
        self.owner = {"pid": os.getpid(), "role": role, **(details or {})}

    def acquire(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock_file = open(self.folder / LOCK_FILE, "a+")  # noqa: SIM115 - held open while locked
        except OSError as error:
            raise StoreError(f"cannot open the database folder {self.folder}: {error.strerror}") from None
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            owner = read_owner(self.folder)
            raise DatabaseBusy(
                f"the database {self.folder} is in use by another process "
                f"({owner.get('role', 'unknown')}, pid {owner.get('pid', '?')})",
                owner,
            ) from None
        self._file = lock_file
        self.write_owner(self.owner)

    def write_owner(self, owner: dict[str, Any]) -> None:
        self.owner = owner
        (self.folder / OWNER_FILE).write_text(json.dumps(owner))

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                (self.folder / OWNER_FILE).unlink()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
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


def _is_damage(error: Exception) -> bool:
    text = str(error)
    return type(error).__name__ == "InternalError" and (
        "apply logs" in text or "compaction" in text.lower() or "backfill" in text
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
