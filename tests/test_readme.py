"""Issue 18: every example command in README.md runs as written against the shipped `dataset/`.

The commands are read from the README's ```bash blocks (```text blocks hold usage synopses), in order,
and run from the repository root with `bash`, so that a changed, renamed or broken example fails here.
What the test changes, and only that: the model is the tiny random-weight checkpoint (MODEL_NAME), the
database and the result grids go to a temporary folder (CHROMA_DB_PATH, RESULTS_FOLDER), `pip install`
steps are left out (this environment is installed), `python -m pytest` is not run (it is this suite),
and the `curl` examples go to a `python api.py` started here on a free port instead of 8000.

Random weights give no meaning, so a "sensible answer" is checked by what holds for any model: each
command succeeds without a traceback, searches find images, a filter's results all match the filter,
an image query finds that image first, and a query without text says it was ranked by vector.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from api_server import ApiServer
from conftest import make_settings

from image_io import find_images
from main import parse_args

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "dataset"
README = ROOT / "README.md"
SHARED_COCO = ROOT.parent / "shared" / "data" / "coco_mini"
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
ROW = re.compile(r"^\s*\d+\s+-?\d+\.\d+\s+(?:-?\d+\.\d+\s+)?(\S+)")
API_ADDRESS = "localhost:8000"
TIMEOUT = 600


@dataclass
class Example:
    command: str
    block: int


def readme_examples() -> list[Example]:
    """Every command of the README's bash blocks: continuation lines joined, `&&` chains split."""
    examples = []
    for number, block in enumerate(BASH_BLOCK.findall(README.read_text())):
        for line in block.replace("\\\n", " ").splitlines():
            for command in line.split(" && "):
                if command.strip():
                    examples.append(Example(command.strip(), number))
    return examples


def skipped(command: str) -> bool:
    words = shlex.split(command, comments=True)
    return words[:2] == ["pip", "install"] or words[:3] == ["python", "-m", "pytest"]


def shipped_tags() -> dict[str, list[str]]:
    with open(DATASET / "metadata.csv", newline="") as file:
        return {row["path"]: row["tags"].split("|") for row in csv.DictReader(file)}


def option(words: list[str], name: str) -> str | None:
    """The value after flag `name` in a command's words."""
    return words[words.index(name) + 1] if name in words else None


def run(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


# -- what each kind of command must answer -------------------------------------------------------


def check_indexing(done: subprocess.CompletedProcess) -> None:
    images = len(list(find_images(DATASET)))
    assert images == len(shipped_tags())
    assert done.stdout.startswith(f"added {images}, ") and "failed 0" in done.stdout, done.stdout


def check_search(words: list[str], done: subprocess.CompletedProcess) -> None:
    """`python main.py ...`: a table of hits that fit the flags and a saved grid (one-shot), or the
    prompt's banner (interactive, here given no input, so it leaves at once)."""
    args = parse_args(words[2:])
    if args.query is None and args.image is None:
        assert f"{len(shipped_tags())} images indexed" in done.stdout
        return
    lines = done.stdout.splitlines()
    rows = [match[1] for match in map(ROW.match, lines[1:]) if match]
    assert rows and lines[-1].startswith("grid: "), done.stdout
    if args.filter is None:
        assert len(rows) == min(int(args.top_k or 5), len(shipped_tags()))
    check_filter(args.filter, rows)
    if args.image is not None:
        assert rows[0] == str(args.image.relative_to("dataset"))
    without_words = args.query is None and args.mode != "vector"
    assert without_words == ("note: " in done.stderr), done.stderr


def check_filter(expression: str | None, paths: list[str]) -> None:
    if expression is None:
        return
    field, operator, value = shlex.split(expression)
    tags = shipped_tags()
    if (field, operator) == ("tags", "contains"):
        assert all(value in tags[path] for path in paths), paths
    elif (field, operator) == ("folder", "="):
        assert all(str(Path(path).parent) == value for path in paths), paths
    else:
        raise AssertionError(f"this test does not yet check the filter {expression!r}")


def check_api_answer(words: list[str], done: subprocess.CompletedProcess) -> None:
    answer = json.loads(done.stdout)
    assert "error" not in answer, answer
    paths = [hit["path"] for hit in answer["results"]]
    assert paths, answer
    body = json.loads(option(words, "-d") or "{}")
    check_filter(body.get("filters"), paths)
    assert answer["mode"] == body.get("mode", "vector")
    for field in words:
        if field.startswith("image=@"):
            assert paths[0] == str(Path(field.removeprefix("image=@")).relative_to("dataset"))


def check_evaluation(done: subprocess.CompletedProcess) -> None:
    assert "text -> image" in done.stdout and "image -> text" in done.stdout, done.stdout


# -- the test ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_readme_example_runs_as_written(tmp_path, tiny_checkpoint):
    examples = readme_examples()
    commands = [example.command for example in examples]
    assert sum(command.startswith("python main.py") for command in commands) >= 4, commands
    assert sum(command.startswith("curl") for command in commands) >= 3, commands
    settings = make_settings(tmp_path, DATASET, tiny_checkpoint)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DISPLAY", "WAYLAND_DISPLAY", "DATASET_FOLDER")
    }
    env |= {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "MODEL_NAME": str(tiny_checkpoint),
        "DEVICE": "cpu",
        "CHROMA_DB_PATH": settings.CHROMA_DB_PATH,
        "RESULTS_FOLDER": settings.RESULTS_FOLDER,
        # Random weights put every image near every other: fold only true duplicates (conftest.py).
        "DUPLICATE_THRESHOLD": str(settings.DUPLICATE_THRESHOLD),
    }
    server: ApiServer | None = None
    ran = 0
    try:
        for example in examples:
            if skipped(example.command):
                continue
            words = shlex.split(example.command, comments=True)
            command = example.command
            if words[0] == "curl":
                if server is None:
                    server = ApiServer(settings).start()
                command = command.replace(API_ADDRESS, f"127.0.0.1:{server.port}")
            elif server is not None:  # the API's examples are done: it hands the database back
                server.stop()
                server = None
            if "../shared/" in command and not SHARED_COCO.is_dir():
                continue  # coco_mini is not beside this checkout
            done = run(command, env)
            assert done.returncode == 0, f"{example.command}\n{done.stdout}\n{done.stderr}"
            assert "Traceback" not in done.stderr and "error:" not in done.stderr, done.stderr
            check_answer(words, done)
            ran += 1
    finally:
        if server is not None:
            server.stop()
    assert ran >= 9


def check_answer(words: list[str], done: subprocess.CompletedProcess) -> None:
    script = words[1] if words[0] == "python" else words[0]
    if script == "embed_images.py":
        check_indexing(done)
    elif script == "main.py":
        check_search(words, done)
    elif script == "curl":
        check_api_answer(words, done)
    elif script == "evaluate.py":
        check_evaluation(done)
    else:
        pytest.fail(f"no check for the README example {shlex.join(words)!r}: add one here")
