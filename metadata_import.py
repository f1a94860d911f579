"""Custom metadata from an archive's own records: a CSV or JSON file mapping images to fields.

CSV: a header with a `path` column (the path relative to the dataset folder, or a bare file name)
and any other columns; several tags go in one `tags` cell separated by `|`. Numbers become numbers.
JSON: a list of objects with a `path` key (tags as a list), or an object mapping paths to objects.
`image`, `file` and `filename` are accepted in place of `path`. Empty cells are ignored.
Every record is checked before anything is stored: at most METADATA_MAX_FIELDS fields of names up to
METADATA_MAX_NAME_CHARS, texts up to METADATA_MAX_VALUE_CHARS, lists up to METADATA_MAX_LIST_ITEMS
and METADATA_MAX_VALUES values in all per image (Chroma cannot store or read past ~5,400 values).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from errors import MetadataError, MetadataFileError

if TYPE_CHECKING:
    from config import Settings

log = logging.getLogger(__name__)

PATH_KEYS = ("path", "image", "file", "filename")
RESERVED_PREFIXES = ("#", "$", "chroma:")
INT64_LIMIT = 2**63
Where = Callable[[int], str]


@dataclass(frozen=True)
class MetadataLimits:
    """How much custom metadata one import and one image may carry (see config.py)."""

    records: int = 500_000
    fields: int = 100
    name_chars: int = 64
    value_chars: int = 10_000
    list_items: int = 100
    values: int = 1_000

    @classmethod
    def from_settings(cls, settings: Settings) -> MetadataLimits:
        return cls(
            records=settings.METADATA_MAX_RECORDS,
            fields=settings.METADATA_MAX_FIELDS,
            name_chars=settings.METADATA_MAX_NAME_CHARS,
            value_chars=settings.METADATA_MAX_VALUE_CHARS,
            list_items=settings.METADATA_MAX_LIST_ITEMS,
            values=settings.METADATA_MAX_VALUES,
        )


@dataclass
class ImportSummary:
    records: int = 0
    matched: int = 0
    updated: int = 0
    unmatched: list[str] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)
    ignored_fields: set[str] = field(default_factory=set)

    def line(self) -> str:
        return (
            f"metadata: {self.records} records, {self.matched} matched, {self.updated} changed, "
            f"{len(self.unmatched)} unmatched, {len(self.ambiguous)} ambiguous"
        )


def read_metadata_file(path: Path, limits: MetadataLimits | None = None) -> list[dict[str, Any]]:
    limits = limits or MetadataLimits()
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as error:
        raise MetadataFileError(f"cannot read metadata file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise MetadataFileError(f"metadata file {path} is not UTF-8 text") from None
    try:
        if str(path).lower().endswith(".json"):
            return normalised_records(_json_records(text, path), limits, lambda n: f"{path}, record {n + 1}")
        return normalised_records(_csv_records(text, path), limits, lambda n: f"{path}, line {n + 2}")
    except MetadataFileError:
        raise
    except MetadataError as error:
        raise MetadataFileError(f"metadata file {error}") from None


def _json_records(text: str, path: Path) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise MetadataFileError(f"metadata file {path} is not valid JSON: {error}") from None
    except RecursionError:
        raise MetadataFileError(f"metadata file {path} is nested too deeply to be metadata") from None
    if isinstance(data, dict) and all(isinstance(value, dict) for value in data.values()):
        data = [{"path": key, **value} for key, value in data.items()]
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise MetadataFileError(f"metadata file {path} must hold a list of objects with a 'path' key")
    return data


def _csv_records(text: str, path: Path) -> list[dict[str, Any]]:
    reader = csv.DictReader(text.splitlines())
    header = [name.strip().lower() for name in reader.fieldnames or []]
    if not any(key in header for key in PATH_KEYS):
        raise MetadataFileError(f"metadata file {path} needs a 'path' column in its header")
    records = []
    for row in reader:
        extra = row.pop(None, None)  # cells beyond the header
        if extra and any(cell.strip() for cell in extra):
            raise MetadataFileError(
                f"metadata file {path}, line {reader.line_num}: more cells than the header has columns"
            )
        records.append({key: _cell(key, value) for key, value in row.items() if value not in (None, "")})
    return records


def _cell(key: str, value: str) -> Any:
    value = value.strip()
    if key.strip().lower() == "tags":
        return [tag.strip() for tag in value.split("|") if tag.strip()]
    try:
        number = int(value)
        return number if abs(number) < INT64_LIMIT else value
    except ValueError:
        pass
    try:
        number = float(value)
        return number if math.isfinite(number) else value
    except ValueError:
        return value


def normalised_records(records: list[Any], limits: MetadataLimits, where: Where) -> list[dict[str, Any]]:
    """Each record as `{"path": ..., field: value}`, checked against the limits; the first bad one raises."""
    if len(records) > limits.records:
        raise MetadataError(
            f"{len(records)} metadata records are more than METADATA_MAX_RECORDS={limits.records} at once"
        )
    return [normalised_record(record, limits, where(number)) for number, record in enumerate(records)]


def normalised_record(record: Any, limits: MetadataLimits, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise MetadataError(f"{where} must be an object with a path")
    if len(record) > limits.fields + 1:
        raise MetadataError(
            f"{where} has {len(record) - 1} fields, more than METADATA_MAX_FIELDS={limits.fields}"
        )
    image_path = None
    fields: dict[str, Any] = {}
    for key, value in record.items():
        name = str(key).strip()
        if name.lower() in PATH_KEYS and image_path is None:
            image_path = value
            continue
        _check_name(name, limits, where)
        stored = _stored_value(name, value, limits, f"{where}.{name}")
        if stored is not None:
            fields[name] = stored
    if not isinstance(image_path, str) or not image_path.strip():
        raise MetadataError(f"{where} needs a path: the image's path relative to the dataset folder")
    check_size(fields, limits, where)
    return {"path": image_path.strip().replace("\\", "/").removeprefix("./"), **fields}


def check_size(fields: dict[str, Any], limits: MetadataLimits, where: str) -> None:
    """Refuse more fields, or more values (list items counted one by one), than an image may hold."""
    if len(fields) > limits.fields:
        raise MetadataError(
            f"{where} has {len(fields)} fields, more than METADATA_MAX_FIELDS={limits.fields}"
        )
    values = sum(len(value) if isinstance(value, list) else 1 for value in fields.values())
    if values > limits.values:
        raise MetadataError(f"{where} holds {values} values, more than METADATA_MAX_VALUES={limits.values}")


def _check_name(name: str, limits: MetadataLimits, where: str) -> None:
    if not name:
        raise MetadataError(f"{where} has a field with an empty name")
    if len(name) > limits.name_chars:
        raise MetadataError(
            f"{where} has a field name of {len(name)} characters ({name[:20]!r}...), "
            f"longer than METADATA_MAX_NAME_CHARS={limits.name_chars}"
        )
    if name.startswith(RESERVED_PREFIXES) or any(ord(char) < 32 or ord(char) == 127 for char in name):
        raise MetadataError(
            f"{where} has a field name {name!r} that cannot be stored (reserved or control characters)"
        )


def _stored_value(name: str, value: Any, limits: MetadataLimits, where: str) -> Any:
    """The value as stored (tags always a list of texts); None for an absent value."""
    if value is None or value == "" or value == []:
        return None
    if name.lower() == "tags":
        value = _tag_list(value, where)
    if isinstance(value, list):
        return _stored_list(value, limits, where)
    return _stored_scalar(value, limits, where)


def _tag_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [tag.strip() for tag in value.split("|") if tag.strip()]
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str | int | float) for item in items):
        raise MetadataError(f"{where} must be text, a number, true/false or a list of those")
    return [str(item).strip() for item in items if str(item).strip()]


def _stored_list(items: list[Any], limits: MetadataLimits, where: str) -> list[Any] | None:
    if len(items) > limits.list_items:
        raise MetadataError(
            f"{where} is a list of {len(items)} items, more than METADATA_MAX_LIST_ITEMS={limits.list_items}"
        )
    stored = [_stored_scalar(item, limits, where) for item in items]
    if len({type(item) for item in stored}) > 1:
        raise MetadataError(
            f"{where} mixes kinds of values: a list holds only texts, only numbers or only true/false"
        )
    return stored or None


def _stored_scalar(value: Any, limits: MetadataLimits, where: str) -> Any:
    if isinstance(value, str):
        if len(value) > limits.value_chars:
            raise MetadataError(
                f"{where} is {len(value)} characters long, "
                f"more than METADATA_MAX_VALUE_CHARS={limits.value_chars}"
            )
        return value
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) >= INT64_LIMIT:
            raise MetadataError(f"{where} is a whole number too large to store (at most 2^63 - 1)")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MetadataError(f"{where} must be a finite number")
        return value
    raise MetadataError(f"{where} must be text, a number, true/false or a list of those")


def merge_records(
    records: list[dict[str, Any]],
    images: list[tuple[str, dict[str, Any]]],
    reserved: frozenset[str],
    limits: MetadataLimits | None = None,
) -> tuple[ImportSummary, dict[str, dict[str, Any]]]:
    """Match records to indexed images; the new metadata of each image whose fields change.

    Raises `MetadataError` before anything is changed when an image would end up over the limits.
    """
    limits = limits or MetadataLimits()
    by_path = {metadata["path"]: image_id for image_id, metadata in images}
    by_name: dict[str, list[str]] = {}
    for image_id, metadata in images:
        by_name.setdefault(metadata["name"], []).append(image_id)
    current = dict(images)
    summary = ImportSummary(records=len(records))
    changes: dict[str, dict[str, Any]] = {}
    for record in records:
        image_path = record["path"]
        image_id = by_path.get(image_path)
        if image_id is None and "/" not in image_path:
            named = by_name.get(os.path.basename(image_path), [])
            if len(named) > 1:
                summary.ambiguous.append(image_path)
                continue
            image_id = named[0] if named else None
        if image_id is None:
            summary.unmatched.append(image_path)
            continue
        summary.matched += 1
        fields = {key: value for key, value in record.items() if key != "path"}
        summary.ignored_fields |= set(fields) & reserved
        merged = changes.get(image_id, current[image_id]) | {
            key: value for key, value in fields.items() if key not in reserved
        }
        if merged != current[image_id]:
            custom = {key: value for key, value in merged.items() if key not in reserved}
            check_size(custom, limits, f"the metadata of {image_path} (all records for it merged)")
            changes[image_id] = merged
    summary.updated = len(changes)
    if summary.ignored_fields:
        log.warning("metadata: ignored built-in fields %s", ", ".join(sorted(summary.ignored_fields)))
    return summary, changes
