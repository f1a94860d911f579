"""The OpenAPI 3 description of the HTTP API (served at GET /openapi.json), as the server behaves."""

from __future__ import annotations

from typing import Any

from api_requests import CUTOFFS, INCLUDE_IMAGES, MODES, SORTS, request_limits
from config import Settings
from explain import DEFAULT_GRID, MAX_GRID, MIN_GRID


def openapi_document(settings: Settings) -> dict[str, Any]:
    """An OpenAPI 3.0 description of every endpoint, as this server behaves."""
    document = {
        "openapi": "3.0.3",
        "info": {
            "title": "Semantic image search",
            "version": "1.0.0",
            "description": "Search a folder of images by text, by example image, by id and by metadata.",
        },
        "paths": _openapi_paths(),
        "components": {"schemas": _openapi_schemas(settings), "responses": _openapi_error_responses()},
    }
    document["components"]["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "API_TOKEN, or the token the server made (CHROMA_DB_PATH/api_token); needed "
            "by every client when API_TOKEN is set, else by web pages of other origins (README, Security)",
        }
    }
    if settings.API_TOKEN:
        document["security"] = [{"bearer": []}]
    return document


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"$ref": f"#/components/responses/Error{code}"} for code in (*codes, 403, 429, 500)}


def _cached_file_responses(description: str, media_type: str) -> dict[str, Any]:
    """A file served with an ETag: 200 with the bytes, or 304 when If-None-Match matches."""
    cached = {"ETag": {"schema": {"type": "string"}}, "Cache-Control": {"schema": {"type": "string"}}}
    return {
        "200": {
            "description": description,
            "headers": cached,
            "content": {media_type: {"schema": {"type": "string", "format": "binary"}}},
        },
        "304": {"description": "not modified (If-None-Match matched the ETag)", "headers": cached},
        **_errors(401, 404),
    }


def _json_number_type(value: float) -> str:
    return "integer" if isinstance(value, int) else "number"


def _openapi_paths() -> dict[str, Any]:
    image_id = {"name": "image_id", "in": "path", "required": True, "schema": {"type": "string"}}
    etag = {"name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"}}
    return {
        "/": {
            "get": {
                "summary": "Health and facts about the index (a token only from web pages of other origins)",
                "security": [],
                "responses": {
                    "200": {"description": "ready", "content": _json_content(_ref("Health"))},
                    **_errors(503),
                },
            }
        },
        "/search": {
            "post": {
                "summary": "Search by text, image, id, weighted parts, with filters and modes",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _ref("SearchRequest")},
                        "multipart/form-data": {"schema": _ref("SearchForm")},
                    },
                },
                "responses": {
                    "200": {
                        "description": "results in rank order",
                        "headers": {
                            "Server-Timing": {
                                "description": "milliseconds of each stage: encode (the query's vector), "
                                "rank, pictures (the inline thumbnails)",
                                "schema": {"type": "string"},
                            }
                        },
                        "content": _json_content(_ref("SearchResponse")),
                    },
                    **_errors(400, 401, 404, 413, 503),
                },
            }
        },
        "/explain": {
            "post": {
                "summary": "Where an indexed image matches a query: a grid of heat values over the image",
                "requestBody": {"required": True, "content": _json_content(_ref("ExplainRequest"))},
                "responses": {
                    "200": {
                        "description": "heat per cell, rows from the top, 0 (coolest) to 1 (warmest)",
                        "content": _json_content(_ref("Explanation")),
                    },
                    **_errors(400, 401, 404, 413, 503),
                },
            }
        },
        "/thumbnails/{image_id}": {
            "get": {
                "summary": "The thumbnail (JPEG, long side THUMBNAIL_SIZE) of an indexed image",
                "parameters": [image_id, etag],
                "responses": _cached_file_responses("the thumbnail", "image/jpeg"),
            }
        },
        "/images/{image_id}": {
            "get": {
                "summary": "The original file of an indexed image",
                "parameters": [image_id, etag],
                "responses": _cached_file_responses("the image file", "image/*"),
            }
        },
        "/index": {
            "get": {
                "summary": "Progress of the current or last indexing job",
                "responses": {
                    "200": {"description": "job status", "content": _json_content(_ref("IndexStatus"))},
                    **_errors(401),
                },
            },
            "post": {
                "summary": "Start indexing the dataset folder in the background (one job at a time)",
                "requestBody": {"required": False, "content": _json_content(_ref("IndexRequest"))},
                "responses": {
                    "202": {"description": "started", "content": _json_content(_ref("IndexStatus"))},
                    "409": {
                        "description": "a job is already running",
                        "content": _json_content(_ref("IndexStatus")),
                    },
                    **_errors(400, 401, 413),
                },
            },
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.0 document",
                        "content": _json_content({"type": "object"}),
                    },
                    **_errors(401),
                },
            }
        },
        "/ui": {
            "get": {
                "summary": "The web page (never needs a token)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "index.html",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    **_errors(404),
                },
            }
        },
        "/static/{filename}": {
            "get": {
                "summary": "Files of the web page (never need a token)",
                "security": [],
                "parameters": [
                    {"name": "filename", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {"description": "the file", "content": {"*/*": {"schema": {"type": "string"}}}},
                    **_errors(404),
                },
            }
        },
    }


LIMIT_DESCRIPTIONS = {
    "max_top_k": "largest top_k a search may ask for",
    "max_offset": "largest offset a search may ask for",
    "max_query_chars": "longest text of a query or part, in characters",
    "max_query_parts": "most parts of a combined query",
    "max_part_weight": "largest weight of a part, either sign",
    "max_previews": "most inline previews a search may ask for",
    "max_filter_chars": "longest filter expression, in characters",
    "max_upload_mb": "largest request body, in MB",
    "max_image_megapixels": "largest uploaded image, in megapixels",
}


def _openapi_schemas(settings: Settings) -> dict[str, Any]:
    limits = request_limits(settings)
    text = {"type": "string", "minLength": 1, "maxLength": limits["max_query_chars"], "pattern": r"\S"}
    number = {"type": "number"}
    search_fields = {
        "query": {**text, "description": "text query"},
        "image": {"type": "string", "minLength": 1, "description": "query image as a data URI or base64"},
        "similar_to": {"type": "string", "description": "id of an indexed image"},
        "parts": {"type": "array", "maxItems": limits["max_query_parts"], "items": _ref("QueryPart")},
        "top_k": {"type": "integer", "minimum": 1, "maximum": limits["max_top_k"], "default": settings.TOP_K},
        "offset": {"type": "integer", "minimum": 0, "maximum": limits["max_offset"], "default": 0},
        "min_score": {"type": "number", "minimum": -1, "maximum": 1},
        "cutoff": {"type": "string", "enum": list(CUTOFFS)},
        "filters": {
            "oneOf": [{"type": "string"}, {"type": "object"}],
            "description": 'e.g. \'tags contains dog and width >= 500\' or {"tags": {"$contains": "dog"}}',
        },
        "mode": {"type": "string", "enum": list(MODES), "default": "vector"},
        "sort": {
            "type": "string",
            "enum": list(SORTS),
            "default": "relevance",
            "description": "taken / -taken: the matching images (filters, keyword match, min_score and "
            "cutoff applied) by date taken, oldest / newest first, images without a date last",
        },
        "collapse_duplicates": {"type": "boolean", "default": True},
        "include_images": {"type": "string", "enum": list(INCLUDE_IMAGES), "default": "thumbnail"},
        "previews": {
            "type": "integer",
            "minimum": 0,
            "maximum": limits["max_previews"],
            "default": 0,
            "description": "with include_images=none: the first N results carry a tiny inline preview",
        },
    }
    json_fields = {name: _nullable(schema) for name, schema in search_fields.items()}
    form_fields = {
        **search_fields,
        "query": {
            "type": "string",
            "maxLength": limits["max_query_chars"],
            "pattern": r"^$|\S",
            "description": "text query; an empty form field counts as not given",
        },
        "image": {"type": "string", "format": "binary", "description": "query image file"},
        "parts": {"type": "string", "description": "the parts array as JSON text"},
        "filters": {"type": "string"},
        "collapse_duplicates": {"type": "string", "enum": ["true", "false"]},
    }
    one_query = [{"required": [name]} for name in ("query", "image", "similar_to", "parts")]
    scalar = {"oneOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "QueryPart": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "text": text,
                "image": {"type": "string", "minLength": 1},
                "id": {"type": "string"},
                "weight": {
                    **number,
                    "minimum": -limits["max_part_weight"],
                    "maximum": limits["max_part_weight"],
                    "default": 1,
                },
            },
            "oneOf": [{"required": ["text"]}, {"required": ["image"]}, {"required": ["id"]}],
        },
        "SearchRequest": {
            "type": "object",
            "additionalProperties": False,
            "properties": json_fields,
            "anyOf": one_query,
        },
        "SearchForm": {
            "type": "object",
            "properties": form_fields,
            "anyOf": [
                {**branch, "properties": {branch["required"][0]: {"minLength": 1}}} for branch in one_query
            ],
        },
        "Hit": _hit_schema(),
        "SearchResponse": {
            "type": "object",
            "required": ["query", "mode", "top_k", "offset", "results", "total_results", "has_more"],
            "properties": {
                "query": {"type": "string", "nullable": True},
                "mode": {"type": "string", "enum": list(MODES), "description": "the mode that ranked"},
                "note": {
                    "type": "string",
                    "description": "present when the mode that ranked is not the one asked for, and why "
                    "(a query without text is ranked by vector in every mode)",
                },
                "top_k": {"type": "integer"},
                "offset": {"type": "integer"},
                "results": {"type": "array", "items": _ref("Hit")},
                "total_results": {"type": "integer", "description": "results on this page"},
                "has_more": {"type": "boolean"},
                "total": {
                    "type": "integer",
                    "nullable": True,
                    "description": "results in all: exact if total_exact, else an estimate; null: unknown",
                },
                "total_exact": {"type": "boolean"},
            },
        },
        "Health": {
            "type": "object",
            "required": [
                "status",
                "images",
                "model",
                "device",
                "collection",
                "indexing",
                "first_pass",
                *limits,
            ],
            "properties": {
                "status": {"type": "string", "enum": ["ok"]},
                "images": {"type": "integer"},
                "model": {"type": "string"},
                "device": {"type": "string"},
                "collection": {"type": "string"},
                "indexing": {"type": "string", "enum": ["idle", "running", "done", "failed"]},
                "first_pass": {
                    "type": "string",
                    "enum": ["scan", "codes building", "codes"],
                    "description": "how exact searches choose their candidates: a scan of every "
                    "vector, or product codes in a library of FIRST_PASS_MIN images or more",
                },
                **{
                    name: {"type": _json_number_type(value), "description": LIMIT_DESCRIPTIONS[name]}
                    for name, value in limits.items()
                },
            },
        },
        "IndexRequest": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "metadata": {
                    "type": "array",
                    "nullable": True,
                    "description": "custom metadata records to merge after indexing",
                    "items": {
                        "type": "object",
                        "required": ["path"],
                        "properties": {"path": {"type": "string", "pattern": r"\S"}},
                        "additionalProperties": {
                            "oneOf": [scalar, {"type": "array", "items": scalar}],
                        },
                    },
                }
            },
        },
        "IndexStatus": _index_status_schema(),
        **_explain_schemas(search_fields),
    }


def _explain_schemas(search_fields: dict[str, Any]) -> dict[str, Any]:
    vector = {"type": "array", "items": {"type": "number"}, "description": "a query vector"}
    grid_values = {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}
    return {
        "ExplainRequest": {
            "type": "object",
            "additionalProperties": False,
            "required": ["id"],
            "properties": {
                "id": {"type": "string", "minLength": 1, "description": "the indexed image to explain"},
                "query": search_fields["query"],
                "vector": vector,
                "image": search_fields["image"],
                "similar_to": search_fields["similar_to"],
                "grid": {
                    "type": "integer",
                    "minimum": MIN_GRID,
                    "maximum": MAX_GRID,
                    "default": DEFAULT_GRID,
                    "description": "cells per side",
                },
            },
            "oneOf": [{"required": [name]} for name in ("query", "vector", "image", "similar_to")],
        },
        "Explanation": {
            "type": "object",
            "required": ["id", "grid", "heat", "scores", "score", "windows", "ms"],
            "properties": {
                "id": {"type": "string"},
                "grid": {"type": "integer"},
                "heat": {**grid_values, "description": "grid x grid values from 0 to 1, rows from the top"},
                "scores": {**grid_values, "description": "each cell's best window score"},
                "score": {"type": "number", "description": "the whole image's score"},
                "windows": {"type": "integer", "description": "windows encoded in the one batch"},
                "ms": {"type": "number", "description": "time the engine took"},
            },
        },
    }


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema that also allows null (the API treats null as not given)."""
    if "oneOf" in schema:
        return {**schema, "oneOf": [_nullable(schema["oneOf"][0]), *schema["oneOf"][1:]]}
    if "enum" in schema:
        return {**schema, "enum": [*schema["enum"], None], "nullable": True}
    return {**schema, "nullable": True}


def _hit_schema() -> dict[str, Any]:
    nullable_int = {"type": "integer", "nullable": True}
    nullable_number = {"type": "number", "nullable": True}
    return {
        "type": "object",
        "required": ["id", "path", "score", "rank", "metadata", "duplicates", "thumbnail_url", "image_url"],
        "properties": {
            "id": {"type": "string"},
            "path": {"type": "string", "description": "relative to the dataset folder"},
            "score": {"type": "number"},
            "rank": {"type": "integer", "minimum": 1},
            "metadata": {"type": "object"},
            "duplicates": {"type": "array", "items": {"type": "string"}},
            "why": {
                "type": "object",
                "description": "keyword and hybrid modes: why the image matched",
                "properties": {
                    "vector_rank": nullable_int,
                    "vector_score": nullable_number,
                    "keyword_rank": nullable_int,
                    "keyword_score": nullable_number,
                    "matched_terms": {"type": "array", "items": {"type": "string"}},
                    "fused_score": {**nullable_number, "description": "hybrid: the fused score that ranks"},
                },
            },
            "image": {
                "type": "string",
                "nullable": True,
                "description": "thumbnail as a data URI (absent with include_images=none)",
            },
            "preview": {
                "type": "string",
                "nullable": True,
                "description": "a tiny JPEG data URI on the first `previews` results (include_images=none)",
            },
            "thumbnail_url": {"type": "string"},
            "image_url": {"type": "string"},
        },
    }


def _index_status_schema() -> dict[str, Any]:
    failure = {
        "type": "object",
        "required": ["path", "reason"],
        "properties": {"path": {"type": "string"}, "reason": {"type": "string"}},
    }
    nullable_text = {"type": "string", "nullable": True}
    return {
        "type": "object",
        "required": ["state", "total", "done", "images_per_second", "failures", "summary", "summary_line"],
        "properties": {
            "state": {"type": "string", "enum": ["idle", "running", "done", "failed"]},
            "total": {"type": "integer"},
            "done": {"type": "integer"},
            "images_per_second": {"type": "number"},
            "failures": {"type": "array", "items": failure},
            "summary": {"type": "object", "nullable": True},
            "summary_line": nullable_text,
            "metadata_line": nullable_text,
            "error": nullable_text,
            "started_at": nullable_text,
            "finished_at": nullable_text,
        },
    }


def _openapi_error_responses() -> dict[str, Any]:
    meanings = {
        400: "invalid request (bad JSON, wrong types, bad filter, bad image, query too long)",
        401: "missing or wrong token",
        403: "the Host header is not a name of this server (ALLOWED_HOSTS)",
        404: "unknown id or route",
        413: "request larger than MAX_UPLOAD_MB",
        429: "rate limit (RATE_LIMIT_PER_MINUTE) exceeded",
        500: "internal error",
        503: "the Chroma server is not answering",
    }
    return {
        f"Error{code}": {"description": meaning, "content": _json_content(_ref("Error"))}
        for code, meaning in meanings.items()
    }
