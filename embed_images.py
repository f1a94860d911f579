"""Index a folder of images: `python embed_images.py [--dataset DIR] [--rebuild] [--batch-size N]`.

Incremental: only new and changed files are encoded, moved and duplicated files reuse their vectors,
deleted files leave the index. When an API server (api.py) owns the embedded database, the work is
handed to that server over HTTP, so that only one process ever writes the database.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from config import Settings, add_index_arguments, index_overrides, load_settings
from errors import DatabaseBusy, fail, run_front_end

log = logging.getLogger("embed_images")
POLL_SECONDS = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Index a folder of images for semantic search.")
    parser.add_argument("--rebuild", action="store_true", help="delete the index and build it anew")
    parser.add_argument("--batch-size", type=int, help="images per model batch (BATCH_SIZE)")
    parser.add_argument("--metadata", type=Path, help="CSV or JSON file of custom metadata to merge")
    add_index_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(BATCH_SIZE=args.batch_size, **index_overrides(args))


class ProgressBar:
    """A tqdm bar fed by the indexer's progress reports."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None

    def update(self, total: int, done: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, unit="img", desc="encoding", file=sys.stderr)
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def index_locally(settings: Settings, args: argparse.Namespace) -> int:
    from image_retrieval import ImageRetrieval
    from metadata_import import MetadataLimits, read_metadata_file

    records = (
        read_metadata_file(args.metadata, MetadataLimits.from_settings(settings)) if args.metadata else None
    )
    bar = ProgressBar(not args.quiet)
    with ImageRetrieval(settings, role="embed_images", rebuild=args.rebuild) as engine:
        try:
            summary = engine.index_folder(lambda progress: bar.update(progress.total, progress.done))
        finally:
            bar.close()
        print(summary.line())
        if records is not None:
            print(engine.import_metadata(records).line())
    return 0


def index_through_server(owner: dict[str, Any], settings: Settings, args: argparse.Namespace) -> int:
    """The API server owns the database: ask it to index, and follow its progress."""
    from metadata_import import MetadataLimits, read_metadata_file

    url = owner["url"].rstrip("/")
    if args.rebuild:
        raise SystemExit(f"error: the API server at {url} is using the database; stop it to --rebuild")
    if owner.get("dataset") and owner["dataset"] != str(Path(settings.DATASET_FOLDER).resolve()):
        raise SystemExit(
            f"error: the API server at {url} indexes {owner['dataset']}; stop it to index another folder"
        )
    headers = {"Authorization": f"Bearer {settings.API_TOKEN}"} if settings.API_TOKEN else {}
    body: dict[str, Any] = {}
    if args.metadata:
        body["metadata"] = read_metadata_file(args.metadata, MetadataLimits.from_settings(settings))
    log.info("the API server at %s owns the database: indexing through it", url)
    start_own_job(url, body, headers)
    bar = ProgressBar(not args.quiet)
    try:
        job = follow_job(url, headers, bar)
    finally:
        bar.close()
    if job["state"] == "failed":
        raise SystemExit(f"error: indexing failed: {job.get('error', 'unknown error')}")
    print(job["summary_line"])
    if job.get("metadata_line"):
        print(job["metadata_line"])
    return 0


def start_own_job(url: str, body: dict[str, Any], headers: dict[str, str]) -> None:
    """POST /index; while another client's job runs (409), wait for it to end, then ask again.

    Following the other job instead would report its summary and drop this run's files and metadata.
    """
    while True:
        response = requests.post(f"{url}/index", json=body, headers=headers, timeout=30)
        if response.status_code == 202:
            return
        if response.status_code != 409:
            raise SystemExit(f"error: the API server refused to index: {_error_text(response)}")
        log.info("another indexing job is running on the server: waiting for it to finish")
        while _job_status(url, headers).get("state") == "running":
            time.sleep(POLL_SECONDS)


def follow_job(url: str, headers: dict[str, str], bar: ProgressBar) -> dict[str, Any]:
    while True:
        job = _job_status(url, headers)
        bar.update(job.get("total", 0), job.get("done", 0))
        if job.get("state") in ("done", "failed"):
            return job
        time.sleep(POLL_SECONDS)


def _job_status(url: str, headers: dict[str, str]) -> dict[str, Any]:
    return requests.get(f"{url}/index", headers=headers, timeout=30).json()


def _error_text(response: requests.Response) -> str:
    try:
        return response.json().get("error", response.text)
    except ValueError:
        return f"HTTP {response.status_code}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_front_end(lambda: settings_from(args), lambda settings: index(settings, args))


def index(settings: Settings, args: argparse.Namespace) -> int:
    """Index here, or through the API server that owns the database."""
    try:
        with logging_redirect_tqdm():  # log lines ("skipped ...") go above the progress bar, not into it
            return index_locally(settings, args)
    except DatabaseBusy as busy:
        if busy.owner.get("role") != "api" or not busy.owner.get("url"):
            raise
        try:
            return index_through_server(busy.owner, settings, args)
        except requests.RequestException as error:
            return fail(f"cannot reach the API server: {error}", 1)
    except KeyboardInterrupt:
        print("interrupted: what was encoded so far is kept; run again to finish", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
