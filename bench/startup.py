"""Benchmark: how long the front ends take to start, against loading the model alone.

    python bench/startup.py [--repeats 5] [--models tiny|vit|both] [--baseline DIR]

Wall time from process launch to exit of `python main.py "a cat"` (a one-shot search of the shipped
`dataset/`, indexed once beforehand into a temporary database), of `--help` of each front end, and of
a fresh `python` that only imports the encoder and loads the same model. `--baseline DIR` times the
same commands in another checkout (e.g. `git archive <commit> | tar -x -C DIR`) in the same run,
interleaved, so that before and after are compared under the same load.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, markdown_table, median, models, report

MODEL_LOAD = """
import sys
sys.path.insert(0, {root!r})
from clip_encoder import ClipEncoder
ClipEncoder({model!r}, "cpu")
"""
COMMANDS = {
    'main.py "a cat"': ["main.py", "a cat"],
    "main.py --help": ["main.py", "--help"],
    "api.py --help": ["api.py", "--help"],
    "embed_images.py --help": ["embed_images.py", "--help"],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (medians are shown)")
    parser.add_argument("--models", choices=["tiny", "vit", "both"], default="tiny")
    parser.add_argument("--baseline", type=Path, help="another checkout to time the same way")
    return parser.parse_args()


def timed(command: list[str], root: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=root, env=env, check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - started


def measure(root: Path, model: Path, folder: Path, repeats: int) -> dict[str, float]:
    """Median seconds of each command and of the model load alone, in the checkout `root`."""
    env = {
        **os.environ,
        "MODEL_NAME": str(model),
        "DEVICE": "cpu",
        "CHROMA_DB_PATH": str(folder / "chroma_db"),
        "RESULTS_FOLDER": str(folder / "results"),
    }
    env.pop("DISPLAY", None)
    subprocess.run([sys.executable, "embed_images.py", "--quiet"], cwd=root, env=env, check=True)
    load = [sys.executable, "-c", MODEL_LOAD.format(root=str(root), model=str(model))]
    times: dict[str, list[float]] = {"model load alone": [], **{name: [] for name in COMMANDS}}
    for _ in range(repeats):
        times["model load alone"].append(timed(load, root, env))
        for name, args in COMMANDS.items():
            times[name].append(timed([sys.executable, *args], root, env))
    return {name: median(values) for name, values in times.items()}


def main() -> None:
    args = parse_args()
    checkouts = {"this checkout": ROOT}
    if args.baseline:
        checkouts = {f"baseline ({args.baseline.name})": args.baseline.resolve(), **checkouts}
    rows = []
    chosen = models(args.models)
    for label, model in chosen.items():
        for name, root in checkouts.items():
            with tempfile.TemporaryDirectory(prefix="bench-startup-") as folder:
                result = measure(root, model, Path(folder), args.repeats)
            one_shot, load = result['main.py "a cat"'], result["model load alone"]
            rows.append(
                [
                    label,
                    name,
                    one_shot,
                    load,
                    one_shot / load,
                    result["main.py --help"],
                    result["api.py --help"],
                    result["embed_images.py --help"],
                ]
            )
            print(rows[-1], flush=True)
    table = markdown_table(
        [
            "model",
            "code",
            'main.py "a cat" s',
            "model load alone s",
            "one-shot / model load",
            "main.py --help s",
            "api.py --help s",
            "embed_images.py --help s",
        ],
        rows,
    )
    notes = [
        f"Medians of {args.repeats} runs of each command, interleaved. Every time is a whole process, "
        "from launch to exit. The model load alone imports torch, torchvision and CLIP and builds the "
        'model; the one-shot `main.py "a cat"` also opens Chroma, mirrors the shipped photos (13; the '
        "baseline's own dataset/ has 7), encodes the text, searches and saves the result grid "
        "(matplotlib). `--help` and argument errors answer before the engine (torch, Chroma) is imported.",
    ]
    report("Start-up: one-shot search and --help against the model load", [table], notes, ", ".join(chosen))


if __name__ == "__main__":
    main()
