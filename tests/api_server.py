"""Run `python api.py` as a real subprocess on a free port, for tests over real HTTP.

    with ApiServer(settings) as server:
        requests.post(f"{server.url}/search", json={"query": "a dog"})

Every field of the given `Settings` is passed to the server as an environment variable of the same
name, so the server runs with exactly those settings. The server's log goes to a file (`log_path`,
by default a temporary file removed by `stop()`); `log()` reads it, and its text is included in the
error when the server fails to start.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import Settings  # noqa: E402

START_TIMEOUT_SECONDS = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings_env(settings: Settings) -> dict[str, str]:
    """Every setting as an environment variable of the same name."""
    return {field.name: str(getattr(settings, field.name)) for field in dataclasses.fields(settings)}


class ApiServer:
    """`python api.py` with the given settings on a free loopback port (or `port`)."""

    def __init__(
        self,
        settings: Settings,
        port: int | None = None,
        extra_env: dict[str, str] | None = None,
        log_path: Path | None = None,
        start_timeout: float = START_TIMEOUT_SECONDS,
    ) -> None:
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self.settings = settings.with_overrides(API_HOST="127.0.0.1", API_PORT=self.port)
        self.extra_env = extra_env or {}
        self._own_log = log_path is None
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="api-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        """The access token: API_TOKEN, or the one the server made and keeps in its database folder."""
        if self.settings.API_TOKEN:
            return self.settings.API_TOKEN
        return (Path(self.settings.CHROMA_DB_PATH) / "api_token").read_text().strip()

    def start(self) -> ApiServer:
        env = {**os.environ, **settings_env(self.settings), **self.extra_env, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "api.py")],
                env=env,
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"api.py exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"api.py did not answer GET / within {self.start_timeout:.0f} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Stop the server; a log file this helper created itself is removed."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        if self._own_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


@contextmanager
def served_in_process(app: Any) -> Iterator[str]:
    """A Flask app served over real HTTP from a thread of this process; yields its URL.

    For tests that need a served page but not a process of their own (no start-up, no model load).
    """
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="served-in-process", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=30)
        server.server_close()
