"""Every error the engine raises on purpose, under one base class, and the front ends' common opening.

Each error keeps the builtin base it had before this module existed (a bad query is still a
`ValueError`, an unknown id a `KeyError`), so callers that catch those keep working. The message of
each says what is wrong and what to do: front ends print it as it is.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from config import Settings


class EngineError(Exception):
    """An error with a message meant for the user."""


class QueryError(EngineError, ValueError):
    """A query that cannot be answered as given; the message says what to change."""


class FilterError(QueryError):
    """A filter that cannot be understood, with what is wrong in words."""


class UnknownImage(EngineError, KeyError):
    """An id that is not in the index."""

    def __str__(self) -> str:
        return f"no indexed image has id {self.args[0]!r}"


class ImageLoadError(EngineError, ValueError):
    """A file that cannot be used as an image, with the reason in words."""


class MetadataError(EngineError, ValueError):
    """Custom metadata that cannot be stored, with what is wrong and where."""


class MetadataFileError(MetadataError):
    """A metadata file that cannot be read, with the reason."""


class IndexingRefused(EngineError, RuntimeError):
    """Indexing would lose data or mix things that must not be mixed; the message says why."""


class ModelLoadError(EngineError, RuntimeError):
    """The configured model name or checkpoint cannot be loaded."""


class StoreError(EngineError, RuntimeError):
    """The database cannot be used as asked; the message says why and what to do."""


class StoreUnavailable(StoreError):
    """The Chroma server cannot be reached (server mode); worth retrying later."""


class DamagedStore(StoreError):
    """Chroma cannot apply a write it has already accepted: nothing more can be read or written."""


class ModelMismatch(StoreError):
    """The collection was built with another model than the configured one."""


class DatabaseBusy(StoreError):
    """Another process owns the embedded database."""

    def __init__(self, message: str, owner: dict[str, Any]) -> None:
        super().__init__(message)
        self.owner = owner


def fail(error: BaseException | str, status: int) -> int:
    """Print `error: <message>` on stderr and return the exit status to use."""
    print(f"error: {error}", file=sys.stderr)
    return status


def run_front_end(
    load_settings: Callable[[], Settings],
    body: Callable[[Settings], int],
    *,
    log_level: int | str | None = None,
    log_format: str = "%(levelname)s %(name)s: %(message)s",
) -> int:
    """The opening every command shares: settings (a bad one exits 2), logging, then `body`, whose
    engine errors exit 1 with their message. `log_level` None means the settings' LOG_LEVEL."""
    try:
        settings = load_settings()
    except ValueError as error:
        return fail(error, 2)
    logging.basicConfig(level=settings.LOG_LEVEL if log_level is None else log_level, format=log_format)
    try:
        return body(settings)
    except EngineError as error:
        return fail(error, 1)
