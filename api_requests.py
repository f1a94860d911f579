"""Reading a search request (JSON or multipart form) into an engine query, with strict checks."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Request
from werkzeug.datastructures import FileStorage, MultiDict

from config import Settings
from image_retrieval import MODES, SORTS, QueryPart, SearchQuery, data_uri_bytes

SEARCH_FIELDS = frozenset(
    {
        "query",
        "image",
        "similar_to",
        "parts",
        "top_k",
        "offset",
        "min_score",
        "cutoff",
        "filters",
        "mode",
        "sort",
        "collapse_duplicates",
        "include_images",
        "previews",
    }
)
PART_FIELDS = frozenset({"text", "image", "id", "weight"})
# Form fields that a form may send empty to mean "not given"; others must hold a value when sent.
BLANK_MEANS_ABSENT = frozenset({"query", "image", "similar_to", "parts", "filters"})
MAX_PART_WEIGHT = 10.0
INCLUDE_IMAGES = ("thumbnail", "none")
# The first `previews` results may carry a tiny inline picture, painted before the thumbnails arrive.
MAX_PREVIEWS = 24
CUTOFFS = ("adaptive", "none")
TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})


EXPLAIN_FIELDS = frozenset({"id", "query", "vector", "image", "similar_to", "grid"})
EXPLAIN_QUERIES = ("query", "vector", "image", "similar_to")


def request_limits(settings: Settings) -> dict[str, int | float]:
    """The bounds a request must keep, as the checks apply them; GET / reports them for the page."""
    return {
        "max_top_k": settings.MAX_TOP_K,
        "max_offset": settings.MAX_OFFSET,
        "max_query_chars": settings.MAX_QUERY_CHARS,
        "max_query_parts": settings.MAX_QUERY_PARTS,
        "max_part_weight": MAX_PART_WEIGHT,
        "max_previews": MAX_PREVIEWS,
        "max_filter_chars": settings.MAX_FILTER_CHARS,
        "max_upload_mb": settings.MAX_UPLOAD_MB,
        "max_image_megapixels": settings.MAX_IMAGE_MEGAPIXELS,
    }


class BadRequest(ValueError):
    """A request that cannot be answered as sent; the message says what to change."""


class NotJson(BadRequest):
    """A body sent to a JSON endpoint under another content type (415)."""


@dataclass
class SearchRequest:
    query: SearchQuery
    text: str | None
    include_images: bool
    previews: int = 0


def search_request_from_json(body: Any) -> SearchRequest:
    if not isinstance(body, dict):
        raise BadRequest('the JSON body must be an object, e.g. {"query": "a dog"}')
    unknown = sorted(set(body) - SEARCH_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; known fields: {', '.join(sorted(SEARCH_FIELDS))}")
    return _search_request({key: value for key, value in body.items() if value is not None})


def search_request_from_form(form: MultiDict[str, str], files: MultiDict[str, FileStorage]) -> SearchRequest:
    unknown = sorted((set(form) | set(files)) - SEARCH_FIELDS, key=str)  # a nameless part's key is None
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; known fields: {', '.join(sorted(SEARCH_FIELDS))}")
    repeated = [key for key, items in [*form.lists(), *files.lists()] if len(items) > 1]
    if repeated or set(form) & set(files):
        raise BadRequest(
            f"the field {(repeated or sorted(set(form) & set(files)))[0]!r} is given more than once"
        )
    values: dict[str, Any] = {
        key: text for key, text in form.items() if text != "" or key not in BLANK_MEANS_ABSENT
    }
    numbers = {"top_k": _form_int, "offset": _form_int, "previews": _form_int, "min_score": _form_float}
    for name, parse in numbers.items():
        if name in values:
            values[name] = parse(name, values[name])
    if "collapse_duplicates" in values:
        values["collapse_duplicates"] = _form_bool("collapse_duplicates", values["collapse_duplicates"])
    if "parts" in values:
        values["parts"] = _form_json("parts", values["parts"])
    upload = files.get("image")
    if upload is not None and upload.filename != "":
        values["image"] = upload.read()
    return _search_request(values)


def _form_int(name: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise BadRequest(f"{name} must be a whole number, not {text!r}") from None


def _form_float(name: str, text: str) -> float:
    try:
        number = float(text.strip())
    except ValueError:
        raise BadRequest(f"{name} must be a number, not {text!r}") from None
    if not math.isfinite(number):
        raise BadRequest(f"{name} must be a finite number")
    return number


def _form_bool(name: str, text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS | FALSE_WORDS:
        return word in TRUE_WORDS
    raise BadRequest(f"{name} must be true or false, not {text!r}")


def _form_json(name: str, text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as error:
        raise BadRequest(f"{name} must be JSON: {error}") from None
    except RecursionError:
        raise BadRequest(f"{name} must be JSON: nested too deeply") from None


def _search_request(values: dict[str, Any]) -> SearchRequest:
    """A search from already-decoded values (JSON types; an uploaded image as bytes)."""
    text = _typed(values, "query", str)
    parts = []
    if text is not None:
        parts.append(QueryPart(text=text))
    if "image" in values:
        parts.append(QueryPart(image=_image_bytes(values["image"], "image")))
    similar_to = _typed(values, "similar_to", str)
    if similar_to is not None:
        parts.append(QueryPart(id=similar_to))
    parts += _parts(values.get("parts"))
    if not parts:
        raise BadRequest("missing query: give query (text), image, similar_to (an image id) or parts")
    include_images = _choice(values, "include_images", INCLUDE_IMAGES, "thumbnail")
    query = SearchQuery(
        parts=parts,
        top_k=_integer(values, "top_k"),
        offset=_integer(values, "offset") or 0,
        min_score=_number(values, "min_score"),
        cutoff=_choice(values, "cutoff", CUTOFFS, None),
        filters=_filters(values.get("filters")),
        mode=_choice(values, "mode", MODES, "vector"),
        sort=_choice(values, "sort", SORTS, "relevance"),
        collapse_duplicates=_typed(values, "collapse_duplicates", bool, True),
    )
    return SearchRequest(query, text, include_images == "thumbnail", _previews(values))


@dataclass
class ExplainRequest:
    image_id: str
    parts: list[QueryPart]
    grid: int | None


def explain_request_from_json(body: Any) -> ExplainRequest:
    """`{"id": ..., "query": "a dog"}` (or vector, image, similar_to instead of query; optional grid)."""
    if not isinstance(body, dict):
        raise BadRequest('the JSON body must be an object, e.g. {"id": "...", "query": "a dog"}')
    unknown = sorted(set(body) - EXPLAIN_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; known fields: {', '.join(sorted(EXPLAIN_FIELDS))}")
    values = {key: value for key, value in body.items() if value is not None}
    image_id = _typed(values, "id", str)
    if not image_id:
        raise BadRequest("missing id: the id of the indexed image to explain")
    given = [name for name in EXPLAIN_QUERIES if name in values]
    if len(given) != 1:
        raise BadRequest(f"give exactly one of {', '.join(EXPLAIN_QUERIES)}")
    return ExplainRequest(image_id, [_explain_part(given[0], values[given[0]])], _integer(values, "grid"))


def _explain_part(name: str, value: Any) -> QueryPart:
    if name == "image":
        return QueryPart(image=_image_bytes(value, name))
    if name == "vector":
        if not isinstance(value, list) or not all(
            isinstance(item, int | float) and not isinstance(item, bool) for item in value
        ):
            raise BadRequest("vector must be a list of numbers")
        with np.errstate(over="ignore"):
            try:
                vector = np.asarray(value, dtype=np.float32)
            except OverflowError:
                raise BadRequest("vector must hold finite numbers") from None
        if not np.isfinite(vector).all():
            raise BadRequest("vector must hold finite numbers")
        return QueryPart(vector=vector)
    text = _typed({name: value}, name, str)
    return QueryPart(text=text) if name == "query" else QueryPart(id=text)


def _typed(values: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = values.get(name, default)
    if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
        raise BadRequest(f"{name} must be {_kind_name(kind)}, not {_json_type(value)}")
    return value


def _integer(values: dict[str, Any], name: str) -> int | None:
    return _typed(values, name, int)


def _previews(values: dict[str, Any]) -> int:
    previews = _integer(values, "previews") or 0
    if not 0 <= previews <= MAX_PREVIEWS:
        raise BadRequest(f"previews must be from 0 to {MAX_PREVIEWS}")
    return previews


def _number(values: dict[str, Any], name: str) -> float | None:
    value = values.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{name} must be a number, not {_json_type(value)}")
    return float(value)


def _choice(values: dict[str, Any], name: str, allowed: tuple[str, ...], default: str | None) -> str | None:
    value = _typed(values, name, str, default)
    if value is not None and value not in allowed:
        raise BadRequest(f"{name} must be one of: {', '.join(allowed)}")
    return value


def _filters(value: Any) -> str | dict[str, Any] | None:
    if value is None or isinstance(value, str | dict):
        return value or None
    raise BadRequest(f"filters must be a string or an object, not {_json_type(value)}")


def _image_bytes(value: Any, name: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return data_uri_bytes(value.strip())
    raise BadRequest(f"{name} must be a data URI or base64 string, not {_json_type(value)}")


def _parts(value: Any) -> list[QueryPart]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"parts must be a list of objects, not {_json_type(value)}")
    return [_part(item, index) for index, item in enumerate(value)]


def _part(item: Any, index: int) -> QueryPart:
    where = f"parts[{index}]"
    if not isinstance(item, dict):
        raise BadRequest(f'{where} must be an object like {{"text": "a dog", "weight": 1}}')
    unknown = sorted(set(item) - PART_FIELDS)
    if unknown:
        raise BadRequest(f"{where} has an unknown field {unknown[0]!r}; use text, image or id, and weight")
    given = [key for key in ("text", "image", "id") if item.get(key) is not None]
    if len(given) != 1:
        raise BadRequest(f"{where} must have exactly one of text, image, id")
    weight = _number(item, "weight")
    if weight is not None and not -MAX_PART_WEIGHT <= weight <= MAX_PART_WEIGHT:
        raise BadRequest(f"{where}.weight must be a number from {-MAX_PART_WEIGHT:g} to {MAX_PART_WEIGHT:g}")
    weight = 1.0 if weight is None else weight
    if given[0] == "image":
        return QueryPart(image=_image_bytes(item["image"], f"{where}.image"), weight=weight)
    value = _typed(item, given[0], str)
    return QueryPart(**{given[0]: value}, weight=weight)


def _kind_name(kind: type) -> str:
    return {str: "a string", int: "an integer", bool: "true or false"}.get(kind, kind.__name__)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    names = {str: "a string", int: "an integer", float: "a number", list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in JSON")


def is_json_type(mimetype: str) -> bool:
    return mimetype == "application/json" or mimetype.endswith("+json")


def json_body(req: Request) -> Any:
    """The parsed JSON body, with a clear error when it is not JSON or not sent as JSON.

    A JSON endpoint refuses other content types (text/plain is what a web page may send anywhere
    without asking), and JSON nested deeper than Python's parser can follow is a 400, not a crash.
    """
    if not is_json_type(req.mimetype):
        raise NotJson(
            f"send the body as JSON with Content-Type: application/json, not {req.mimetype or 'none'}"
        )
    raw = req.get_data(cache=True)
    if not raw.strip():
        raise BadRequest("the request body is empty: send a JSON object")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise BadRequest(f"invalid JSON: {error}") from None
    except RecursionError:
        raise BadRequest("invalid JSON: nested too deeply") from None
