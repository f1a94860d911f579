"""Shared fixtures: a tiny random-weight CLIP checkpoint, datasets, settings and engines."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_factory import coco_like_dataset, write_tiny_checkpoint  # noqa: E402

from config import Settings  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CLIP with random weights, saved as a state-dict checkpoint (loaded like ViT-B/32)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny-clip.pt")


@pytest.fixture(scope="session")
def encoder(tiny_checkpoint: Path):
    from clip_encoder import ClipEncoder

    return ClipEncoder(str(tiny_checkpoint), "cpu")


@pytest.fixture(scope="session")
def coco_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Real captioned photos from ../shared/data/coco_mini, or generated ones when it is absent."""
    return coco_like_dataset(tmp_path_factory.mktemp("coco"))


@pytest.fixture
def coco_dataset(tmp_path: Path, coco_source: tuple[Path, list[dict]]) -> Path:
    """A private, writable copy of the captioned photos."""
    dataset = tmp_path / "dataset"
    shutil.copytree(coco_source[0], dataset)
    return dataset


def make_settings(tmp_path: Path, dataset: Path, checkpoint: Path, **overrides) -> Settings:
    return Settings(
        DATASET_FOLDER=str(dataset),
        CHROMA_DB_PATH=str(tmp_path / "chroma_db"),
        MODEL_NAME=str(checkpoint),
        DEVICE="cpu",
        BATCH_SIZE=16,
        RESULTS_FOLDER=str(tmp_path / "results"),
        # Random weights put all images close together (median cosine 0.95), so only true
        # duplicates are collapsed in tests; collapse itself is tested on constructed vectors.
        DUPLICATE_THRESHOLD=0.9999,
        # A server-mode mirror would otherwise go to ~/.cache; embedded ones stay in the database folder.
        MIRROR_FOLDER=str(tmp_path / "mirror") if overrides.get("CHROMA_HOST") else "",
    ).with_overrides(**overrides)


def server_settings(
    tmp_path: Path, dataset: Path, checkpoint: Path, server: ChromaServer, **overrides
) -> Settings:
    """Settings of a process that uses the Chroma server `server`, unthrottled as tests call quickly."""
    return make_settings(
        tmp_path,
        dataset,
        checkpoint,
        CHROMA_HOST=server.host,
        CHROMA_PORT=server.port,
        RATE_LIMIT_PER_MINUTE=0,
        **overrides,
    )


@pytest.fixture
def settings_for(tmp_path: Path, tiny_checkpoint: Path):
    def build(dataset: Path, **overrides) -> Settings:
        return make_settings(tmp_path, dataset, tiny_checkpoint, **overrides)

    return build


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def chroma_server(tmp_path: Path):
    """A real `chroma run` server on a free loopback port; yields (host, port, process control)."""
    server = ChromaServer(tmp_path / "chroma_server_data", free_port())
    server.start()
    yield server
    server.stop()


class ChromaServer:
    def __init__(self, path: Path, port: int) -> None:
        self.path, self.port, self.host = path, port, "127.0.0.1"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        chroma = shutil.which("chroma") or str(Path(sys.executable).with_name("chroma"))
        self.process = subprocess.Popen(
            [chroma, "run", "--path", str(self.path), "--host", self.host, "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://{self.host}:{self.port}/api/v2/heartbeat", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.2)
        raise RuntimeError("chroma server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path
