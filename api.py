"""The HTTP API: `python api.py [--host H] [--port P] [--dataset DIR] [--model NAME|PATH] ...`.

A Flask application (`create_app`) over one shared `ImageRetrieval`, served by waitress. The model is
loaded and the collection mirrored before the server listens. When the API owns an embedded database,
it records its URL in the database's owner file, so that `embed_images.py` hands indexing to it
(`POST /index`) instead of opening the database a second time.
"""

from __future__ import annotations

import argparse
import base64
import functools
import gc
import hashlib
import ipaddress
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from flask import Flask, Response, current_app, jsonify, request, send_file, send_from_directory
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from api_access import (
    TOKEN_FILE_NAME,
    AccessPolicy,
    HostPolicy,
    cors_origin_patterns,
    foreign_origin,
    load_or_create_token,
)
from api_openapi import openapi_document
from api_requests import (
    BadRequest,
    NotJson,
    SearchRequest,
    explain_request_from_json,
    is_json_type,
    json_body,
    request_limits,
    search_request_from_form,
    search_request_from_json,
)
from config import Settings, add_index_arguments, index_overrides, load_settings
from errors import (
    ImageLoadError,
    IndexingRefused,
    MetadataError,
    QueryError,
    StoreError,
    StoreUnavailable,
    UnknownImage,
    fail,
    run_front_end,
)
from image_io import thumbnail_jpeg
from image_retrieval import ImageRetrieval, SearchResult
from indexer import IndexProgress
from metadata_import import normalised_records

log = logging.getLogger("api")

ROOT = Path(__file__).resolve().parent
THUMBNAIL_CACHE_BYTES = 64 * 1024 * 1024
CACHE_SECONDS = 300
# Inline previews (`previews` in a search): long side and JPEG quality; about 1 KB each as a data URI.
PREVIEW_SIZE = 48
PREVIEW_QUALITY = 60
# Turns of libgomp's wait loop an idle OpenMP thread spins before it sleeps (2-3 ms on this machine;
# libgomp's default is 300,000, or 1,000 once its threads outnumber the cores).
OPENMP_SPIN_COUNT = "100000"
BODY_MARGIN_BYTES = 1024 * 1024
RATE_WINDOW_SECONDS = 60.0
PAGE_PATHS = ("/ui",)
PAGE_PREFIXES = ("/static/",)


# -- thumbnails ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thumbnail:
    jpeg: bytes
    data_uri: str


class ThumbnailCache:
    """Thumbnails by (content hash, size), least recently used dropped first, bounded in bytes."""

    def __init__(self, max_bytes: int = THUMBNAIL_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, int], Thumbnail] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> Thumbnail | None:
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None:
                self._entries.move_to_end(key)
            return cached

    def get_or_make(self, key: tuple[str, int], make: Callable[[], bytes]) -> Thumbnail:
        cached = self.get(key)
        if cached is not None:
            return cached
        jpeg = make()
        thumbnail = Thumbnail(jpeg, "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii"))
        with self._lock:
            if key not in self._entries:
                self._entries[key] = thumbnail
                self._bytes += _thumbnail_bytes(thumbnail)
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= _thumbnail_bytes(dropped)
        return thumbnail


def _thumbnail_bytes(thumbnail: Thumbnail) -> int:
    return len(thumbnail.jpeg) + len(thumbnail.data_uri)


# -- rate limiting -------------------------------------------------------------------------------


class RateLimiter:
    """At most `per_minute` requests per client in any sliding 60-second window (0: unlimited)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._recent: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> float:
        """0 if the request is allowed (and counted), else the seconds until it would be."""
        if self.per_minute <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            recent = self._recent.setdefault(client, deque())
            while recent and recent[0] <= now - RATE_WINDOW_SECONDS:
                recent.popleft()
            if len(recent) >= self.per_minute:
                return recent[0] + RATE_WINDOW_SECONDS - now
            recent.append(now)
            if len(self._recent) > 10000:
                self._forget_idle_clients(now)
            return 0.0

    def _forget_idle_clients(self, now: float) -> None:
        idle = [client for client, times in self._recent.items() if times[-1] <= now - RATE_WINDOW_SECONDS]
        for client in idle:
            del self._recent[client]


# -- background indexing -------------------------------------------------------------------------


@dataclass
class IndexJobStatus:
    state: str = "idle"
    total: int = 0
    done: int = 0
    images_per_second: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    summary_line: str | None = None
    metadata_line: str | None = None
    error: str | None = None
    started_at: str | None = None
    finished_at: str | None = None


class IndexJob:
    """One indexing run of the dataset folder at a time, in a background thread."""

    def __init__(self, engine: ImageRetrieval) -> None:
        self.engine = engine
        self._status = IndexJobStatus()
        self._lock = threading.Lock()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._status.__dict__, failures=list(self._status.failures))

    @property
    def state(self) -> str:
        return self._status.state

    def start(self, metadata: list[dict[str, Any]] | None) -> bool:
        """Start a run; False if one is already running."""
        with self._lock:
            if self._status.state == "running":
                return False
            self._status = IndexJobStatus(state="running", started_at=_now_iso())
        threading.Thread(target=self._run, args=(metadata,), name="index-job", daemon=True).start()
        return True

    def _run(self, metadata: list[dict[str, Any]] | None) -> None:
        try:
            summary = self.engine.index_folder(on_progress=self._on_progress)
            metadata_line = self.engine.import_metadata(metadata).line() if metadata else None
        except (IndexingRefused, StoreError, MetadataError) as error:
            log.warning("indexing failed: %s", error)
            self._finish(state="failed", error=self._public_message(str(error)))
            return
        except Exception:
            log.exception("indexing failed")
            self._finish(state="failed", error="indexing failed with an internal error (see the server log)")
            return
        self._finish(
            state="done",
            summary=summary.as_dict(),
            summary_line=summary.line(),
            metadata_line=metadata_line,
            failures=[{"path": path, "reason": reason} for path, reason in summary.failures],
        )

    def _on_progress(self, progress: IndexProgress) -> None:
        with self._lock:
            self._status.total = progress.total
            self._status.done = progress.done
            self._status.images_per_second = round(progress.images_per_second, 3)
            self._status.failures = [{"path": path, "reason": reason} for path, reason in progress.failures]

    def _finish(self, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self._status, name, value)
            self._status.finished_at = _now_iso()

    def _public_message(self, message: str) -> str:
        """The message without the server's absolute dataset path."""
        return message.replace(str(self.engine.dataset_root), "DATASET_FOLDER")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- responses -----------------------------------------------------------------------------------


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    response = jsonify(error=message)
    response.status_code = status
    response.headers.update(headers or {})
    return response


class Api:
    """The state behind the routes: the engine, the index job, the thumbnail cache, the limits."""

    def __init__(self, settings: Settings, engine: ImageRetrieval) -> None:
        self.settings = settings
        self.engine = engine
        self.index_job = IndexJob(engine)
        self.thumbnails = ThumbnailCache()
        self.rate_limiter = RateLimiter(settings.RATE_LIMIT_PER_MINUTE)
        self.hosts = HostPolicy.from_settings(settings.API_HOST, settings.allowed_hosts)
        self.access = AccessPolicy(
            token=settings.API_TOKEN or load_or_create_token(Path(settings.CHROMA_DB_PATH)),
            token_is_set=bool(settings.API_TOKEN),
            trusted_origins=tuple(cors_origin_patterns(settings.cors_origins)),
        )

    @property
    def cache_control(self) -> str:
        return f"private, max-age={CACHE_SECONDS}"

    def health(self) -> dict[str, Any]:
        self.engine.store.check()
        encoder = self.engine.encoder
        return {
            "status": "ok",
            "images": self.engine.count(),
            "model": encoder.identity,
            "device": encoder.device,
            "collection": self.settings.COLLECTION_NAME,
            "indexing": self.index_job.state,
            "first_pass": self.engine.store.first_pass(),
            **request_limits(self.settings),
        }

    def search(self, search: SearchRequest) -> tuple[dict[str, Any], dict[str, float]]:
        """The answer, and the milliseconds its stages took (encode, rank, pictures)."""
        result = self.engine.search(search.query)
        started = time.perf_counter()
        results = self._results(result, search.include_images, search.previews)
        timings = {**result.timings, "pictures": (time.perf_counter() - started) * 1000}
        answer = {
            "query": search.text,
            "mode": result.mode,
            "top_k": search.query.top_k or self.settings.TOP_K,
            "offset": search.query.offset,
            "results": results,
            "total_results": len(result.hits),
            "has_more": result.has_more,
            "total": result.total,
            "total_exact": result.total_exact,
        }
        if result.note:
            answer["note"] = result.note
        return answer, timings

    def _results(self, result: SearchResult, include_images: bool, previews: int) -> list[dict[str, Any]]:
        hits = result.hit_dicts()
        for hit in hits:
            hit["thumbnail_url"] = f"/thumbnails/{hit['id']}"
            hit["image_url"] = f"/images/{hit['id']}"
        if include_images:
            self._add_pictures(hits, "image")
        else:
            self._add_pictures(hits[:previews], "preview", PREVIEW_SIZE)
        return hits

    def _add_pictures(self, hits: list[dict[str, Any]], key: str, size: int | None = None) -> None:
        """Inline thumbnails. Those cached, and those of images no larger than the thumbnail, are made
        here; the others side by side on the thumbnail threads (Pillow lets go of the GIL while
        decoding), since a page of photos not cached yet decodes ten files, but handing a thumbnail to
        another thread costs more than making one of a small image."""
        size = size or self.settings.THUMBNAIL_SIZE
        with ExitStack() as files:
            sources = [self._thumbnail_source(hit["id"], hit["metadata"], size, files) for hit in hits]
            pictures = [self.thumbnails.get(source.key) if source else None for source in sources]
            missing = [i for i, source in enumerate(sources) if source and pictures[i] is None]
            apart = [i for i in missing if not _no_larger_than(hits[i]["metadata"], size)]
            apart = apart if len(apart) > 1 else []
            here = [i for i in missing if i not in apart]
            made_apart = _thumbnail_pool().map(self._made_thumbnail, [sources[i] for i in apart])
            for i in here:
                pictures[i] = self._made_thumbnail(sources[i])
            for i, picture in zip(apart, made_apart, strict=True):
                pictures[i] = picture
        for hit, picture in zip(hits, pictures, strict=True):
            hit[key] = picture.data_uri if picture else None

    def _thumbnail_source(
        self, image_id: str, metadata: dict[str, Any], size: int, files: ExitStack
    ) -> ThumbnailSource | None:
        """The image's file, opened until `files` closes; None where it is gone or unreadable."""
        try:
            return files.enter_context(self._opened_source(image_id, size, metadata))
        except UnknownImage:
            log.warning("no thumbnail for %s: its file is gone or unreadable", metadata.get("path"))
            return None

    def _made_thumbnail(self, source: ThumbnailSource) -> Thumbnail | None:
        try:
            return self.thumbnails.get_or_make(source.key, lambda: self._thumbnail_jpeg(source))
        except UnknownImage:
            return None

    def metadata(self, image_id: str) -> dict[str, Any]:
        return self.engine.metadata(image_id)

    def thumbnail(self, image_id: str, if_none_match: Any = None) -> ServedThumbnail:
        """The THUMBNAIL_SIZE thumbnail of the image's file as it is now (opened once), cached while the
        file is unchanged. When `if_none_match` matches, the thumbnail is not made (`thumbnail` is None:
        a 304)."""
        with self._opened_source(image_id, self.settings.THUMBNAIL_SIZE) as source:
            if if_none_match is not None and if_none_match.contains(source.etag):
                return ServedThumbnail(None, source.etag)
            made = self.thumbnails.get_or_make(source.key, lambda: self._thumbnail_jpeg(source))
            return ServedThumbnail(made, source.etag)

    @contextmanager
    def _opened_source(
        self, image_id: str, size: int, metadata: dict[str, Any] | None = None
    ) -> Iterator[ThumbnailSource]:
        """The image's file, opened once and checked (`metadata`: the image's, where the caller has
        read it already), with the tag of its thumbnail at `size`."""
        metadata = metadata or self.metadata(image_id)
        file, opened = self.engine.open_file(image_id, metadata)
        with file:
            etag = f"{file_etag(metadata, opened)[:32]}-{size}"
            yield ThumbnailSource(image_id, str(metadata.get("path")), file, etag, size)

    def _thumbnail_jpeg(self, source: ThumbnailSource) -> bytes:
        """The thumbnail's JPEG; the small inline previews are saved at lower quality."""
        quality = PREVIEW_QUALITY if source.size <= PREVIEW_SIZE else 85
        try:
            return thumbnail_jpeg(source.file, source.size, self.settings.MAX_IMAGE_MEGAPIXELS, quality)
        except (ImageLoadError, OSError) as error:
            log.warning("cannot make a thumbnail of %s: %s", source.path, error)
            raise UnknownImage(source.image_id) from None


@dataclass(frozen=True)
class ThumbnailSource:
    """An image's file, opened, and the cache key of its thumbnail at one size."""

    image_id: str
    path: str
    file: BinaryIO
    etag: str
    size: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.etag, self.size)


def _no_larger_than(metadata: dict[str, Any], size: int) -> bool:
    """Whether the image's recorded pixels fit a `size` square: its thumbnail costs less to make than
    to hand to another thread."""
    width, height = metadata.get("width"), metadata.get("height")
    return isinstance(width, int) and isinstance(height, int) and width * height <= size * size


@dataclass(frozen=True)
class ServedThumbnail:
    thumbnail: Thumbnail | None
    etag: str


def file_etag(metadata: dict[str, Any], opened: os.stat_result) -> str:
    """An entity tag of the file as it is now: its indexed content hash and its current identity.

    A file replaced or edited after indexing (another inode, size or modification time) gets a new tag.
    """
    facts = (metadata.get("content_hash"), opened.st_dev, opened.st_ino, opened.st_size, opened.st_mtime_ns)
    identity = ":".join(str(fact) for fact in facts)
    return hashlib.sha256(identity.encode()).hexdigest()


@functools.cache
def _thumbnail_pool() -> ThreadPoolExecutor:
    """Threads that make a page's thumbnails side by side (Pillow lets go of the GIL while decoding)."""
    from loaders import available_cores  # torch: imported once the engine is up, not by `api.py --help`

    return ThreadPoolExecutor(max_workers=available_cores(), thread_name_prefix="thumbnails")


def current_api() -> Api:
    return current_app.extensions["image_search_api"]


# -- the application -----------------------------------------------------------------------------


def create_app(settings: Settings | None = None, engine: ImageRetrieval | None = None) -> Flask:
    """The Flask app over one shared engine (built from `settings` when not given)."""
    settings = settings or (engine.settings if engine is not None else load_settings())
    engine = engine or ImageRetrieval(settings, role="api")
    app = Flask(__name__, static_folder=None)
    max_bytes = int(settings.MAX_UPLOAD_MB * 1024 * 1024)
    app.config.update(MAX_CONTENT_LENGTH=max_bytes, MAX_FORM_MEMORY_SIZE=max_bytes)
    app.json.sort_keys = False
    app.extensions["image_search_api"] = Api(settings, engine)
    _log_requests(app)
    app.before_request(guard_request)
    app.after_request(add_response_headers)
    _register_error_handlers(app)
    _register_routes(app)
    return app


def _log_requests(app: Flask) -> None:
    """One INFO line per request: method, path, status, milliseconds, client (no query, body or token)."""

    def start_clock() -> None:
        request.environ["api.started"] = time.perf_counter()

    def log_request(response: Response) -> Response:
        started = request.environ.get("api.started", time.perf_counter())
        log.info(
            "%s %s %d %.1f ms %s",
            request.method,
            _printable(request.path),
            response.status_code,
            (time.perf_counter() - started) * 1000,
            request.remote_addr or "-",
        )
        return response

    app.before_request(start_clock)
    app.after_request(log_request)


CONTROL_CHARACTERS = {code: f"\\x{code:02x}" for code in [*range(32), 127]}


def _printable(text: str) -> str:
    """`text` with control characters escaped, so that a request cannot forge log lines."""
    return text.translate(CONTROL_CHARACTERS)


def guard_request() -> Response | None:
    """Host, rate limit, upload size and token, before any route runs (README, Security)."""
    api = current_api()
    if not api.hosts.allows(request.host):
        return error_response(
            403,
            f"this server does not answer to the host name {request.host!r}: "
            "add it to ALLOWED_HOSTS to allow it",
        )
    retry_after = api.rate_limiter.retry_after(request.remote_addr or "unknown")
    if retry_after > 0:
        return error_response(
            429,
            f"too many requests: at most {api.settings.RATE_LIMIT_PER_MINUTE} per minute",
            {"Retry-After": str(math.ceil(retry_after))},
        )
    if request.content_length and request.content_length > current_app.config["MAX_CONTENT_LENGTH"]:
        raise RequestEntityTooLarge()
    if request.method == "OPTIONS" or _is_public(request.path) or api.access.authorised(request):
        return None
    return error_response(401, api.access.refusal(request), {"WWW-Authenticate": "Bearer"})


def _is_public(path: str) -> bool:
    """The page's own files, and the health check for programs (not for pages of other origins)."""
    if path in PAGE_PATHS or path.startswith(PAGE_PREFIXES):
        return True
    return path == "/" and request.method in ("GET", "HEAD") and foreign_origin(request) is None


def add_response_headers(response: Response) -> Response:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    current_api().access.add_cors_headers(request, response)
    return response


def _register_error_handlers(app: Flask) -> None:
    app.register_error_handler(NotJson, lambda error: error_response(415, str(error)))
    app.register_error_handler(BadRequest, lambda error: error_response(400, str(error)))
    app.register_error_handler(QueryError, lambda error: error_response(400, str(error)))
    app.register_error_handler(UnknownImage, lambda error: error_response(404, str(error)))
    app.register_error_handler(StoreUnavailable, _store_unavailable)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _internal_error)


def _store_unavailable(error: StoreUnavailable) -> Response:
    log.warning("store unavailable: %s", error)
    return error_response(503, f"{error}; try again shortly", {"Retry-After": "5"})


def _http_error(error: HTTPException) -> Response:
    response = error.get_response()
    response.data = json.dumps({"error": _http_error_message(error)})
    response.content_type = "application/json"
    return response


def _http_error_message(error: HTTPException) -> str:
    if error.code == 404:
        return f"not found: {request.method} {request.path}"
    if isinstance(error, MethodNotAllowed):
        allowed = ", ".join(sorted(set(error.valid_methods or []) - {"HEAD", "OPTIONS"}))
        return f"method {request.method} is not allowed on {request.path}; allowed: {allowed}"
    if isinstance(error, TooManyFormParts):
        limit = current_app.config["MAX_FORM_PARTS"]
        return f"the form has too many parts: at most {limit} fields and files"
    if error.code == 413:
        return f"the request is larger than MAX_UPLOAD_MB={current_api().settings.MAX_UPLOAD_MB:g} MB"
    return f"{error.name}: {error.description}"


def _internal_error(error: Exception) -> Response:
    log.error("error answering %s %s", request.method, request.path, exc_info=error)
    return error_response(500, "internal server error (details are in the server log)")


def _register_routes(app: Flask) -> None:
    app.add_url_rule("/", "health", health, methods=["GET"])
    app.add_url_rule("/search", "search", search, methods=["POST"])
    app.add_url_rule("/explain", "explain", explain, methods=["POST"])
    app.add_url_rule("/thumbnails/<image_id>", "thumbnail", thumbnail, methods=["GET"])
    app.add_url_rule("/images/<image_id>", "image", image, methods=["GET"])
    app.add_url_rule("/index", "index_status", index_status, methods=["GET"])
    app.add_url_rule("/index", "start_index", start_index, methods=["POST"])
    app.add_url_rule("/openapi.json", "openapi", openapi, methods=["GET"])
    app.add_url_rule("/ui", "ui", ui, methods=["GET"])
    app.add_url_rule("/static/<path:filename>", "static_file", static_file, methods=["GET"])


# -- routes --------------------------------------------------------------------------------------


def health() -> Response:
    return jsonify(current_api().health())


def search() -> Response:
    answer, timings = current_api().search(parsed_search_request())
    response = jsonify(answer)
    response.headers["Server-Timing"] = server_timing(timings)
    return response


def server_timing(timings: dict[str, float]) -> str:
    """A Server-Timing header (shown by browsers' developer tools): each stage's milliseconds."""
    return ", ".join(f"{stage};dur={milliseconds:.2f}" for stage, milliseconds in timings.items())


def parsed_search_request() -> SearchRequest:
    mimetype = request.mimetype
    if mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return search_request_from_form(*_form_fields())
    if is_json_type(mimetype):
        return search_request_from_json(json_body(request))
    raise BadRequest("send the search as JSON (application/json) or as multipart/form-data")


class TooManyFormParts(RequestEntityTooLarge):
    """A form of more fields and files than MAX_FORM_PARTS, however small."""


def _form_fields() -> tuple[Any, Any]:
    """The form's fields and files; a form refused for its number of parts is told as such."""
    try:
        return request.form, request.files
    except RequestEntityTooLarge:
        length = request.content_length
        if length is not None and length <= current_app.config["MAX_CONTENT_LENGTH"]:
            raise TooManyFormParts() from None
        raise


def explain() -> Response:
    """Where an indexed image matches a query: a grid of heat values, computed on demand."""
    engine = current_api().engine
    wanted = explain_request_from_json(json_body(request))
    options = {} if wanted.grid is None else {"grid": wanted.grid}
    explanation = engine.explain(wanted.image_id, wanted.parts, **options)
    return jsonify({"id": wanted.image_id, **explanation.as_dict()})


def thumbnail(image_id: str) -> Response:
    api = current_api()
    served = api.thumbnail(image_id, request.if_none_match)
    if served.thumbnail is None:
        response = Response(status=304)
    else:
        response = Response(served.thumbnail.jpeg, mimetype="image/jpeg")
    response.set_etag(served.etag)
    response.headers["Cache-Control"] = api.cache_control
    return response


def image(image_id: str) -> Response:
    api = current_api()
    metadata = api.metadata(image_id)
    file, opened = api.engine.open_file(image_id)
    response = send_file(
        file,
        download_name=os.path.basename(metadata["path"]),
        etag=file_etag(metadata, opened)[:64],
        last_modified=opened.st_mtime,
        conditional=True,
    )
    if response.status_code == 200:
        response.content_length = opened.st_size
    else:
        file.close()
    response.headers["Cache-Control"] = api.cache_control
    return response


def index_status() -> Response:
    return jsonify(current_api().index_job.status())


def start_index() -> Response:
    api = current_api()
    has_body = bool(request.get_data(cache=True).strip())
    metadata = _index_metadata(json_body(request), api.engine) if has_body else None
    if not api.index_job.start(metadata):
        status = api.index_job.status()
        status["error"] = "an indexing job is already running; follow it with GET /index"
        return Response(json.dumps(status), status=409, mimetype="application/json")
    response = jsonify(api.index_job.status())
    response.status_code = 202
    response.headers["Location"] = "/index"
    return response


def _index_metadata(body: Any, engine: ImageRetrieval) -> list[dict[str, Any]] | None:
    if not isinstance(body, dict):
        raise BadRequest('the body of POST /index must be an object, e.g. {"metadata": [...]}')
    unknown = sorted(set(body) - {"metadata"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; the only field is metadata")
    records = body.get("metadata")
    if records is None:
        return None
    if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
        raise BadRequest("metadata must be a list of objects, each with a path")
    try:
        return normalised_records(records, engine.metadata_limits, lambda number: f"metadata[{number}]")
    except MetadataError as error:
        raise BadRequest(str(error)) from None


def openapi() -> Response:
    return jsonify(openapi_document(current_api().settings))


def ui() -> Response:
    page = ROOT / "index.html"
    if not page.is_file():
        return error_response(404, "the web page (index.html) is not installed")
    response = send_file(page, mimetype="text/html")
    response.headers["Cache-Control"] = "no-cache"
    return response


def static_file(filename: str) -> Response:
    response = send_from_directory(ROOT / "static", filename)
    response.headers["Cache-Control"] = "no-cache"
    return response


# -- running the server --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve the semantic image search HTTP API.")
    parser.add_argument("--host", help="address to bind (API_HOST)")
    parser.add_argument("--port", type=int, help="port (API_PORT)")
    add_index_arguments(parser)
    parser.add_argument("--threads", type=int, help="request threads (API_THREADS)")
    args = parser.parse_args(argv)
    if args.port is not None and not 0 <= args.port <= 65535:
        parser.error("--port must be from 0 to 65535")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(
        API_HOST=args.host,
        API_PORT=args.port,
        API_THREADS=args.threads,
        **index_overrides(args),
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_url(host: str, port: int) -> str:
    """The URL at which a process on this machine reaches the server."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def announce_owner(engine: ImageRetrieval, url: str) -> None:
    """Tell other processes (embed_images.py) that this server owns the database, and where it is."""
    lock = engine.store.lock
    if lock is not None:
        lock.write_owner({**lock.owner, "role": "api", "url": url, "dataset": str(engine.dataset_root)})


def serve(settings: Settings, engine: ImageRetrieval) -> None:
    import waitress

    app = create_app(settings, engine)
    server = waitress.create_server(
        app,
        host=settings.API_HOST,
        port=settings.API_PORT,
        threads=settings.API_THREADS,
        # A body declared (or found) well over the upload limit is refused by waitress before it is read
        # or spooled to disk; one just over it is answered by the app's JSON 413 (guard_request).
        max_request_body_size=int(settings.MAX_UPLOAD_MB * 1024 * 1024) + BODY_MARGIN_BYTES,
        # Idle or half-open connections are closed soon, and many of them never stop new ones.
        connection_limit=settings.API_CONNECTION_LIMIT,
        channel_timeout=settings.API_IDLE_SECONDS,
        cleanup_interval=max(1, settings.API_IDLE_SECONDS // 3),
    )
    url = local_url(str(server.effective_host), int(server.effective_port))
    announce_owner(engine, url)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    # The start-up's objects (torch, Chroma, the model: ~400k) stay for the process's life; frozen, the
    # garbage collector no longer scans them: a full collection inside a request 150 ms -> 0.1 ms.
    gc.freeze()
    log.info("serving %d images at %s", engine.count(), url)
    threading.Thread(target=engine.store.read_recent_fields, name="recent-fields", daemon=True).start()
    for line in connect_instructions(settings, url, app.extensions["image_search_api"].access.token):
        log.info("%s", line)
    try:
        server.run()
    except (KeyboardInterrupt, SystemExit):
        log.info("stopping")
    finally:
        server.close()


def connect_instructions(settings: Settings, url: str, token: str) -> list[str]:
    """How to open the web page: /ui as it is, a page opened from disk with the access token."""
    page = (ROOT / "index.html").as_uri()
    if settings.API_TOKEN:
        return [
            f"web page: {url}/ui (enter API_TOKEN in its Settings)",
            f"page opened from disk: {page}?api={url} (enter API_TOKEN in its Settings)",
        ]
    token_file = Path(settings.CHROMA_DB_PATH) / TOKEN_FILE_NAME
    return [
        f"web page: {url}/ui",
        f"page opened from disk: {page}?api={url}#token={token}",
        f"  (or paste the access token into the page's Settings: {token}; it is kept in {token_file})",
    ]


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bound_openmp_spinning()
    return run_front_end(
        lambda: settings_from(args),
        run_server,
        log_format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def bound_openmp_spinning(environ: MutableMapping[str, str] = os.environ) -> None:
    """Let OpenMP's idle threads (torch's, faiss's) spin for `OPENMP_SPIN_COUNT` turns before they
    sleep, unless OMP_WAIT_POLICY or GOMP_SPINCOUNT says otherwise. A text query encodes on every core,
    then scans the product codes on every core: threads that sleep at once must be woken for each of
    the encoder's small parallel steps (OMP_WAIT_POLICY=PASSIVE: a text query 6.7 ms slower at 1M),
    and threads that spin on take a core from the scan (`python bench/wait_policy.py`). Read when
    torch loads, so set before the engine is built."""
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT


def run_server(settings: Settings) -> int:
    if not is_loopback(settings.API_HOST) and not settings.API_TOKEN:
        log.warning("binding to %s without API_TOKEN: anyone who can reach it can search", settings.API_HOST)
    with ImageRetrieval(settings, role="api") as engine:
        try:
            serve(settings, engine)
        except OSError as error:
            return fail(f"cannot listen on {settings.API_HOST}:{settings.API_PORT}: {error}", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
