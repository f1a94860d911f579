"""Custom metadata from an archive's own records: a CSV or JSON file mapping images to fields.

CSV: a header with a `path` column (the path relative to the dataset folder, or a bare file name)
and any other columns; several tags go in one `tags` cell separated by `|`. Numbers become numbers.
JSON: a list of objects with a `path` key (tags as a list), or an object mapping paths to objects.
`image`, `file` and `filename` are accepted in place of `path`. Empty cells are ignored.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PATH_KEYS = ("path", "image", "file", "filename")


class MetadataFileError(ValueError):
    """A metadata file that cannot be read, with the reason."""


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


def read_metadata_file(path: Path) -> list[dict[str, Any]]:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as error:
        raise MetadataFileError(f"cannot read metadata file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise MetadataFileError(f"metadata file {path} is not UTF-8 text") from None
    if str(path).lower().endswith(".json"):
        return _json_records(text, path)
    return _csv_records(text, path)


def _json_records(text: str, path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise MetadataFileError(f"metadata file {path} is not valid JSON: {error}") from None
    if isinstance(data, dict) and all(isinstance(value, dict) for value in data.values()):
        data = [{"path": key, **value} for key, value in data.items()]
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise MetadataFileError(f"metadata file {path} must hold a list of objects with a 'path' key")
    return [_normalised(record, path, number) for number, record in enumerate(data, start=1)]


def _csv_records(text: str, path: Path) -> list[dict[str, Any]]:
    reader = csv.DictReader(text.splitlines())
    header = [name.strip().lower() for name in reader.fieldnames or []]
    if not any(key in header for key in PATH_KEYS):
        raise MetadataFileError(f"metadata file {path} needs a 'path' column in its header")
    records = []
    for number, row in enumerate(reader, start=2):
        record = {
            (key or "").strip(): _cell(key or "", value)
            for key, value in row.items()
            if value not in (None, "")
        }
        records.append(_normalised(record, path, number))
    return records


def _cell(key: str, value: str | list[str]) -> Any:
    if isinstance(value, list):
        value = ",".join(value)
    value = value.strip()
    if key.strip().lower() == "tags":
        return [tag.strip() for tag in value.split("|") if tag.strip()]
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _normalised(record: dict[str, Any], path: Path, number: int) -> dict[str, Any]:
    record = {str(key).strip(): value for key, value in record.items()}
    key = next((key for key in record if key.lower() in PATH_KEYS), None)
    if key is None or not isinstance(record[key], str) or not record[key].strip():
        raise MetadataFileError(f"metadata file {path}, record {number}: no 'path'")
    image_path = record.pop(key).strip().replace("\\", "/").removeprefix("./")
    tags = record.get("tags")
    if isinstance(tags, str):
        record["tags"] = [tag.strip() for tag in tags.split("|") if tag.strip()]
    elif tags is not None and not isinstance(tags, list):
        record["tags"] = [str(tags)]
    if isinstance(record.get("tags"), list):
        record["tags"] = [str(tag) for tag in record["tags"]]
    return {"path": image_path, **{k: v for k, v in record.items() if _storable(v)}}


def _storable(value: Any) -> bool:
    if isinstance(value, list):
        return all(isinstance(item, (str, int, float, bool)) for item in value)
    return isinstance(value, (str, int, float, bool))


def merge_records(
    records: list[dict[str, Any]],
    images: list[tuple[str, dict[str, Any]]],
    reserved: frozenset[str],
) -> tuple[ImportSummary, dict[str, dict[str, Any]]]:
    """Match records to indexed images; the new metadata of each image whose fields change."""
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
            changes[image_id] = merged
    summary.updated = len(changes)
    if summary.ignored_fields:
        log.warning("metadata: ignored built-in fields %s", ", ".join(sorted(summary.ignored_fields)))
    return summary, changes
