"""Issue 18: what a new user sees first: fast `--help`, clean console output, a log line per request.

Each front end runs as a real process, as a user starts it.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from api_server import ApiServer, settings_env
from conftest import make_settings

ROOT = Path(__file__).resolve().parents[1]
HEAVY_MODULES = ("torch", "torchvision", "clip", "chromadb", "onnxruntime", "matplotlib")
IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", re.MULTILINE)
TOKEN = "first-run-secret-token-3141"


def run_script(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def imported_modules(stderr: str) -> set[str]:
    """Top-level names of every module a `python -X importtime` run imported."""
    return {name.split(".")[0] for name in IMPORTED.findall(stderr)}


@pytest.mark.parametrize(
    ("script", "args", "status", "words"),
    [
        ("api.py", ["--help"], 0, "usage: api.py"),
        ("api.py", ["--port", "70000"], 2, "--port must be from 0 to 65535"),
        ("api.py", ["--bogus"], 2, "unrecognized arguments: --bogus"),
        ("main.py", ["--help"], 0, "usage: main.py"),
        ("main.py", ["a cat", "--top-k", "0"], 2, "whole number from 1 to"),
        ("main.py", ["a cat", "--mode", "fuzzy"], 2, "invalid choice: 'fuzzy'"),
        ("embed_images.py", ["--help"], 0, "usage: embed_images.py"),
        ("embed_images.py", ["--batch-size", "0"], 2, "--batch-size must be at least 1"),
    ],
)
def test_help_and_argument_errors_answer_without_importing_torch(script, args, status, words):
    done = run_script(script, *args)
    assert done.returncode == status, done.stderr[-2000:]
    assert words in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert not imported_modules(done.stderr) & set(HEAVY_MODULES), sorted(imported_modules(done.stderr))


def test_a_bad_setting_answers_without_importing_torch():
    env = {**os.environ, "TOP_K": "many"}
    for script in ("api.py", "main.py", "embed_images.py"):
        done = run_script(script, env=env)
        assert done.returncode == 2 and "TOP_K='many' is not a valid int" in done.stderr, done.stderr[-2000:]
        assert not imported_modules(done.stderr) & set(HEAVY_MODULES), script


def test_embed_images_output_is_clean(tmp_path, tiny_checkpoint, coco_source):
    """No library warnings, and each "skipped" line on a line of its own above the progress bar."""
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    for photo in sorted(coco_source[0].glob("*.jpg"))[:6]:
        shutil.copy(photo, dataset / photo.name)
    for name in ("zz_broken_1.jpg", "zz_broken_2.jpg", "zz_broken_3.png"):
        (dataset / name).write_text("not an image")
    settings = make_settings(tmp_path, dataset, tiny_checkpoint, BATCH_SIZE=1, LOADER_THREADS=1)
    done = subprocess.run(
        [sys.executable, str(ROOT / "embed_images.py")],
        cwd=ROOT,
        env={**os.environ, **settings_env(settings)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("added 6, ") and "failed 3" in done.stdout
    segments = [segment.strip() for segment in re.split(r"[\r\n]", done.stderr) if segment.strip()]
    assert any(segment.startswith("encoding:") for segment in segments), done.stderr  # the bar was drawn
    skipped = [segment for segment in segments if "skipped" in segment]
    assert len(skipped) == 3, done.stderr
    assert all(re.match(r"WARNING indexer: skipped zz_broken_\d\.(jpg|png): ", line) for line in skipped), (
        skipped
    )
    others = [
        segment
        for segment in segments
        if not segment.startswith("encoding:") and not re.match(r"(INFO|WARNING) [\w.]+: ", segment)
    ]
    assert others == [], done.stderr  # e.g. a FutureWarning and its source line
    assert "Warning" not in done.stderr


def test_the_api_logs_one_line_per_request(tmp_path, tiny_checkpoint, coco_source):
    source, annotations = coco_source
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    for annotation in annotations[:4]:
        shutil.copy(source / annotation["image"], dataset / annotation["image"])
    settings = make_settings(tmp_path, dataset, tiny_checkpoint, API_TOKEN=TOKEN, RATE_LIMIT_PER_MINUTE=0)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    photo = (dataset / annotations[0]["image"]).read_bytes()
    with ApiServer(settings, log_path=tmp_path / "api.log") as server:
        url = server.url
        started = requests.post(f"{url}/index", headers=headers, timeout=30)
        assert started.status_code == 202
        while requests.get(f"{url}/index", headers=headers, timeout=30).json()["state"] == "running":
            time.sleep(0.2)
        before = server.log().count("\n")
        sent = [
            ("GET", "/", 200, requests.get(f"{url}/?token={TOKEN}", timeout=30)),
            (
                "POST",
                "/search",
                200,
                requests.post(
                    f"{url}/search", headers=headers, files={"image": ("a.jpg", photo)}, timeout=60
                ),
            ),
            ("POST", "/search", 401, requests.post(f"{url}/search", json={"query": "a cat"}, timeout=30)),
            (
                "POST",
                "/search",
                400,
                requests.post(f"{url}/search", headers=headers, json={"query": ""}, timeout=30),
            ),
            ("GET", "/no/such/page", 404, requests.get(f"{url}/no/such/page", headers=headers, timeout=30)),
            (
                "GET",
                "/a\\x0aINFO forged",
                404,
                requests.get(f"{url}/a%0AINFO forged", headers=headers, timeout=30),
            ),
        ]
        for _, _, status, response in sent:
            assert response.status_code == status, response.text
    log = server.log()
    lines = [line for line in log.splitlines()[before:] if " INFO api: " in line and " ms " in line]
    found = [re.search(r" INFO api: (\S+) (.+) (\d{3}) (\d+\.\d) ms (\S+)$", line) for line in lines]
    assert all(found), lines
    assert [(m[1], m[2], int(m[3]), m[5]) for m in found] == [
        (method, path, status, "127.0.0.1") for method, path, status, _ in sent
    ]
    assert TOKEN not in log
    assert base64.b64encode(photo[:300]).decode()[:40] not in log
    assert "FutureWarning" not in log and "Traceback" not in log
