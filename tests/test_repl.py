"""Issue 6: the terminal REPL (main.py), driven through a pseudo-terminal, and its one-shot mode.

Every printed table is checked against the engine's own answer to the same query, and every saved
grid is checked pixel by pixel: one cell per result, holding that result's image, the rest blank.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pexpect
import pytest
from api_server import settings_env
from PIL import Image, ImageOps

from config import Settings
from image_retrieval import ImageRetrieval, QueryPart, SearchQuery, no_words_note
from result_grid import GridLayout
from store import DatabaseLock

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "search> "
IMAGES = 12
ROW = re.compile(r"^\s*(\d+)\s+(-?\d+\.\d{4})\s+(\S+)")
RANKED_ROW = re.compile(
    r"^\s*(\d+)\s+(\d+\.\d{5})\s+(-?\d+\.\d{4})\s+(\S+)\s+\((vector \S+, keyword \S+.*)\)$"
)
GRID = re.compile(r"^grid: (\S+\.png)$", re.MULTILINE)
START_TIMEOUT = 240
ANSWER_TIMEOUT = 120


@dataclass
class Printed:
    """One search as the REPL printed it, and what the engine must answer to the same query."""

    query: SearchQuery
    rows: list[tuple[int, float, str]]
    grid: Path | None
    more_like: str | None = None


# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
def indexed(tmp_path: Path, coco_source, settings_for) -> Settings:
    """12 captioned photos with their categories as tags, indexed by the engine (then closed)."""
    source, annotations = coco_source
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    chosen = annotations[:IMAGES]
    for annotation in chosen:
        shutil.copy(source / annotation["image"], dataset / annotation["image"])
    records = [{"path": a["image"], "description": a["captions"][0], "tags": a["categories"]} for a in chosen]
    (dataset / "metadata.json").write_text(json.dumps(records))
    settings = settings_for(dataset)
    with ImageRetrieval(settings) as engine:
        assert engine.index_folder().added == IMAGES
    return settings


def repl_env(settings: Settings) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "WAYLAND_DISPLAY")}
    # A REPL that hangs is sent SIGABRT, and faulthandler then prints where each thread was.
    return {**env, **settings_env(settings), "TERM": "dumb", "PYTHONFAULTHANDLER": "1"}


def start_repl(settings: Settings) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        [str(ROOT / "main.py")],
        env=repl_env(settings),
        cwd=str(ROOT),
        encoding="utf-8",
        timeout=START_TIMEOUT,
        dimensions=(50, 220),
    )
    child.expect_exact(PROMPT)
    return child


def expect_exit(child: pexpect.spawn) -> None:
    """Wait for the REPL to exit; if it hangs, fail with the stacks of its threads."""
    try:
        child.expect(pexpect.EOF, timeout=ANSWER_TIMEOUT)
    except pexpect.TIMEOUT:
        child.kill(signal.SIGABRT)
        child.expect(pexpect.EOF, timeout=30)
        pytest.fail(f"the REPL did not exit; its threads:\n{child.before}")


def ask(child: pexpect.spawn, line: str) -> list[str]:
    """Type a line, wait for the next prompt; the lines printed in between (without the echo)."""
    child.sendline(line)
    child.expect_exact(PROMPT, timeout=ANSWER_TIMEOUT)
    lines = [text.rstrip() for text in child.before.replace("\r", "").split("\n")]
    assert lines[0].endswith(line), f"expected the echo of {line!r}, got {lines[0]!r}"
    return [text for text in lines[1:] if text]


def run_main(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        env=repl_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )


def table_rows(lines: list[str]) -> list[tuple[int, float, str]]:
    """(rank, the score that ranks, path) of each row; in keyword and hybrid mode a cosine column and
    the rank reasons follow that score."""
    header = lines[0].split()
    if header[1] == "score":
        assert header == ["rank", "score", "path"], lines
        rows = [ROW.match(line) for line in lines[1:] if not line.startswith("grid: ")]
        assert all(rows), lines
        return [(int(row[1]), float(row[2]), row[3]) for row in rows]
    assert header in (["rank", "fused", "cosine", "path"], ["rank", "keyword", "cosine", "path"]), lines
    rows = [RANKED_ROW.match(line) for line in lines[1:] if not line.startswith("grid: ")]
    assert all(rows), lines
    return [(int(row[1]), float(row[2]), row[4]) for row in rows]


def ranking_score(hit, mode: str) -> float:
    return {"hybrid": hit.fused_score, "keyword": hit.keyword_score}.get(mode, hit.score)


def grid_path(lines: list[str]) -> Path:
    found = GRID.findall("\n".join(lines))
    assert len(found) == 1, lines
    return Path(found[0])


def one_error_line(lines: list[str], words: str) -> None:
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and words in lines[0], lines


def tags_by_path(settings: Settings) -> dict[str, list[str]]:
    records = json.loads((Path(settings.DATASET_FOLDER) / "metadata.json").read_text())
    return {record["path"]: record["tags"] for record in records}


# -- checking the grids ---------------------------------------------------------------------------


def upright(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def drawn_thumbnail(cell: np.ndarray, source: Image.Image) -> np.ndarray:
    """The part of a cell's image area covered by `source`, scaled to fit and top-centred, inset 3 px."""
    height, width = cell.shape[:2]
    scale = min(width / source.width, height / source.height)
    drawn_w, drawn_h = int(source.width * scale), int(source.height * scale)
    left = (width - drawn_w) // 2
    return cell[3 : drawn_h - 3, left + 3 : left + drawn_w - 3].astype(np.float64)


def difference(cell: np.ndarray, source: Image.Image) -> float:
    region = drawn_thumbnail(cell, source)
    resized = np.asarray(source.resize((region.shape[1], region.shape[0])), dtype=np.float64)
    return float(np.abs(region - resized).mean())


def check_grid(png: Path, rows: list[tuple[int, float, str]], dataset: Path) -> None:
    """The PNG has exactly one cell per result, in rank order, showing that result's image."""
    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB"))
        description = json.loads(image.text["Grid"])
    layout = GridLayout.for_count(len(rows))
    assert (pixels.shape[1], pixels.shape[0]) == layout.size_px
    assert (description["rows"], description["columns"]) == (layout.rows, layout.columns)
    assert [title.split()[0] for title in description["titles"]] == [f"#{rank}" for rank, _, _ in rows]
    assert [title.split()[2] for title in description["titles"]] == [Path(p).name for _, _, p in rows]
    sources = [upright(dataset / path) for _, _, path in rows]
    for slot in range(layout.rows * layout.columns):
        left, top, right, bottom = layout.image_box(slot)
        cell = pixels[top:bottom, left:right]
        if slot >= len(rows):
            assert (cell >= 250).all(), f"{png.name}: unused cell {slot} is not blank"
            continue
        differences = [difference(cell, source) for source in sources]
        assert differences[slot] < 30, f"{png.name}: cell {slot} does not show {rows[slot][2]}"
        distinct = [d for i, d in enumerate(differences) if rows[i][2] != rows[slot][2]]
        assert all(differences[slot] < d for d in distinct), f"{png.name}: cell {slot} shows another image"


def check_against_engine(settings: Settings, searches: list[Printed]) -> None:
    """Every printed table is the engine's answer to the same query, rank by rank."""
    with ImageRetrieval(settings) as engine:
        id_of = {metadata["path"]: image_id for image_id, metadata in engine.store.items()}
        for printed in searches:
            query = printed.query
            if printed.more_like is not None:
                query.parts = [QueryPart(id=id_of[printed.more_like])]
            result = engine.search(query)
            expected = [(hit.rank, ranking_score(hit, result.mode), hit.path) for hit in result.hits]
            assert [(rank, path) for rank, _, path in printed.rows] == [(r, p) for r, _, p in expected]
            for (_, score, _), (_, exact, _) in zip(printed.rows, expected, strict=True):
                assert abs(score - exact) <= 6e-5


# -- the tests ------------------------------------------------------------------------------------


def test_interactive_session(indexed: Settings, tmp_path: Path):
    settings = indexed
    dataset = Path(settings.DATASET_FOLDER)
    tags = tags_by_path(settings)
    tag, _ = Counter(t for values in tags.values() for t in set(values)).most_common(1)[0]
    example = sorted(tags)[3]
    searches: list[Printed] = []

    def search(
        line: str, query: SearchQuery, more_like: str | None = None, note: str | None = None
    ) -> list[tuple[int, float, str]]:
        lines = ask(child, line)
        if note is not None:
            assert lines[0] == f"note: {note}", lines
            lines = lines[1:]
        rows = table_rows(lines)
        png = grid_path(lines)
        assert png.parent == Path(settings.RESULTS_FOLDER) and png.is_file()
        searches.append(Printed(query, rows, png, more_like))
        return rows

    child = start_repl(settings)
    banner = child.before
    assert f"{IMAGES} images indexed" in banner
    assert "Traceback" not in banner

    help_lines = ask(child, ":help")
    for command in (":k N", ":image PATH", ":more N", ":mode", ":filter", ":min", ":open N", ":quit"):
        assert any(line.strip().startswith(command) for line in help_lines), command
    one_error_line(ask(child, ":more 1"), "no search yet")
    one_error_line(ask(child, ":open 1"), "no search yet")

    rows = search("a dog on a couch", SearchQuery([QueryPart(text="a dog on a couch")], top_k=5))
    assert [rank for rank, _, _ in rows] == [1, 2, 3, 4, 5]
    assert grid_path(ask(child, "a dog on a couch")).name.startswith("a-dog-on-a-couch-")

    assert ask(child, ":k 3") == ["results per query: 3"]
    one_error_line(ask(child, ":k abc"), "whole number")
    one_error_line(ask(child, ":k 0"), "whole number")
    assert ask(child, ":k") == ["results per query: 3"]
    rows = search("food on a table", SearchQuery([QueryPart(text="food on a table")], top_k=3))
    assert len(rows) == 3

    threshold = round((rows[0][1] + rows[-1][1]) / 2, 5)
    assert ask(child, f":min {threshold}") == [f"minimum score: {threshold:g}"]
    one_error_line(ask(child, ":min 7"), "from -1 to 1")
    text = "food on a table"
    kept = search(text, SearchQuery([QueryPart(text=text)], top_k=3, min_score=threshold))
    assert kept == [row for row in rows if row[1] >= threshold]
    assert ask(child, ":min") == ["minimum score cleared"]

    assert ask(child, f":filter tags contains {tag}") == [f"filter: tags contains {tag}"]
    one_error_line(ask(child, ":filter width >>> 3"), "")
    rows = search(
        "a photo", SearchQuery([QueryPart(text="a photo")], top_k=3, filters=f"tags contains {tag}")
    )
    assert rows and all(tag in tags[path] for _, _, path in rows)
    assert ask(child, ":filter") == ["filter cleared"]

    word = json.loads((dataset / "metadata.json").read_text())[0]["description"].split()[-1].strip(".")
    assert ask(child, ":mode hybrid") == ["mode: hybrid"]
    one_error_line(ask(child, ":mode fuzzy"), "vector, keyword, hybrid")
    rows = search(word, SearchQuery([QueryPart(text=word)], top_k=3, mode="hybrid"))
    assert [score for _, score, _ in rows] == sorted((score for _, score, _ in rows), reverse=True)

    # No words to match: :image and :more rank by vector in hybrid mode too, and say so.
    by_vector = no_words_note("hybrid")
    image_query = SearchQuery([QueryPart(image=dataset / example)], top_k=3)
    rows = search(f":image {dataset / example}", image_query, note=by_vector)
    assert rows[0][2] == example and rows[0][1] > 0.999
    second = rows[1][2]
    more = search(":more 2", SearchQuery([], top_k=3), more_like=second, note=by_vector)
    assert second not in [path for _, _, path in more]
    assert ask(child, ":mode vector") == ["mode: vector"]
    assert search(f":image {dataset / example}", image_query) == rows
    assert ask(child, ":open 1") == [str((dataset / more[0][2]).resolve())]
    one_error_line(ask(child, ":open 9"), "1 to 3")

    one_error_line(ask(child, ":bogus"), "unknown command :bogus")
    one_error_line(ask(child, ":image /no/such/picture.jpg"), "no such image file")
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a picture")
    one_error_line(ask(child, f":image {not_an_image}"), "cannot be used")

    child.sendline(":quit")
    expect_exit(child)
    child.close()
    assert child.exitstatus == 0
    assert "Traceback" not in child.before

    history = (Path(settings.RESULTS_FOLDER) / ".repl_history").read_text()
    assert "a dog on a couch" in history and ":k 3" in history
    for printed in searches:
        check_grid(printed.grid, printed.rows, dataset)
    check_against_engine(settings, searches)


@pytest.mark.parametrize(("typed", "key"), [("", "d"), ("half a quer", "c")])
def test_ctrl_d_and_ctrl_c_leave_cleanly(indexed: Settings, typed: str, key: str):
    """Ctrl-D at an empty prompt (on a typed line it deletes, as in any shell) and Ctrl-C anywhere."""
    child = start_repl(indexed)
    child.send(typed)
    if typed:
        child.expect_exact(typed, timeout=ANSWER_TIMEOUT)
    child.sendcontrol(key)
    expect_exit(child)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "Traceback" not in child.before


def test_one_shot_text_and_image(indexed: Settings):
    dataset = Path(indexed.DATASET_FOLDER)
    done = run_main(indexed, "a dog in the snow", "--top-k", "8")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    rows = table_rows(lines)
    assert [rank for rank, _, _ in rows] == list(range(1, 9))
    png = grid_path(lines)
    assert png.name.startswith("a-dog-in-the-snow-")
    check_grid(png, rows, dataset)

    example = sorted(tags_by_path(indexed))[0]
    done = run_main(indexed, "--image", str(dataset / example), "--top-k", "4")
    assert done.returncode == 0, done.stderr
    rows = table_rows(done.stdout.splitlines())
    assert len(rows) == 4 and rows[0][2] == example
    check_grid(grid_path(done.stdout.splitlines()), rows, dataset)

    done = run_main(indexed, "--image", str(dataset / example), "--top-k", "4", "--mode", "hybrid")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == f"note: {no_words_note('hybrid')}"
    assert table_rows(done.stdout.splitlines()) == rows

    searches = [
        Printed(SearchQuery([QueryPart(text="a dog in the snow")], top_k=8), table_rows(lines), png),
        Printed(SearchQuery([QueryPart(image=dataset / example)], top_k=4), rows, None),
    ]
    check_against_engine(indexed, searches)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["a dog", "--top-k", "0"], "whole number from 1 to"),
        (["a dog", "--min-score", "two"], "minimum score"),
        (["a dog", "--filter", "width >>> 3"], "--filter"),
    ],
)
def test_one_shot_bad_flags(indexed: Settings, args: list[str], words: str):
    done = run_main(indexed, *args)
    assert done.returncode == 2
    assert words in done.stderr and "Traceback" not in done.stderr
    assert not Path(indexed.RESULTS_FOLDER).exists()


def test_missing_or_empty_index(tmp_path: Path, coco_dataset: Path, settings_for):
    settings = settings_for(coco_dataset)
    missing = run_main(settings, "a dog")
    assert missing.returncode == 1
    assert "python embed_images.py" in missing.stderr and "Traceback" not in missing.stderr
    assert not Path(settings.CHROMA_DB_PATH).exists()

    ImageRetrieval(settings).close()
    empty = run_main(settings, "a dog")
    assert empty.returncode == 1
    assert "empty" in empty.stderr and "python embed_images.py" in empty.stderr
    assert "Traceback" not in empty.stderr


def test_database_held_by_the_api_server(indexed: Settings):
    lock = DatabaseLock(Path(indexed.CHROMA_DB_PATH), "api", {"url": "http://127.0.0.1:8765"})
    lock.acquire()
    try:
        done = run_main(indexed, "a dog")
    finally:
        lock.release()
    assert done.returncode == 1
    assert "in use by the API server at http://127.0.0.1:8765" in done.stderr
    assert "Traceback" not in done.stderr
