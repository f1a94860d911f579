"""Shared helpers of the benchmarks: machine facts, model checkpoints, tables and bench/RESULTS.md.

Every benchmark prints a table and appends it to bench/RESULTS.md together with the machine's CPU,
core count, GPU, model, package versions, date and the exact command that produced it.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DATA = BENCH / "data"
ONNX_CACHE = DATA / "onnx"  # ONNX_CACHE_FOLDER of the benchmarks
RESULTS = BENCH / "RESULTS.md"
COCO_MINI = ROOT.parent / "shared" / "data" / "coco_mini"

for folder in (ROOT, ROOT / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from api_server import ApiServer  # noqa: E402 - tests/ is on the path only from here on

__all__ = ["ApiServer"]

PACKAGES = ("torch", "clip-anytorch", "chromadb", "numpy", "pillow", "onnxruntime", "flask", "waitress")
DRIFT_NOTE = (
    "The machine is shared (other developers run tests on the same 2 cores), so absolute times drift "
    "between runs; the ratios are measured within one run, back to back."
)


# The vision and text towers of OpenAI's released models, as clip.model.CLIP's arguments.
ARCHITECTURES = {
    "vit-b-32": dict(
        embed_dim=512,
        vision_layers=12,
        vision_width=768,
        vision_patch_size=32,
        transformer_width=512,
        transformer_heads=8,
        transformer_layers=12,
    ),
    "vit-l-14": dict(
        embed_dim=768,
        vision_layers=24,
        vision_width=1024,
        vision_patch_size=14,
        transformer_width=768,
        transformer_heads=12,
        transformer_layers=12,
    ),
}


def random_checkpoint(architecture: str) -> Path:
    """A released CLIP architecture with random weights (as fast as the trained model), cached."""
    path = DATA / f"{architecture}-random.pt"
    if not path.is_file():
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from clip.model import CLIP

        torch.manual_seed(0)
        model = CLIP(
            image_resolution=224,
            context_length=77,
            vocab_size=49408,
            **ARCHITECTURES[architecture],
        )
        DATA.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return path


def vit_b32_checkpoint() -> Path:
    return random_checkpoint("vit-b-32")


def vit_l14_checkpoint() -> Path:
    return random_checkpoint("vit-l-14")


def tiny_checkpoint() -> Path:
    """The tiny random-weight CLIP of the tests (tests/data_factory.py), cached."""
    from data_factory import write_tiny_checkpoint

    path = DATA / "tiny-clip.pt"
    if not path.is_file():
        DATA.mkdir(parents=True, exist_ok=True)
        write_tiny_checkpoint(path)
    return path


def models(choice: str) -> dict[str, Path]:
    """The benchmark models by label: `vit`, `vitl`, `tiny`, `both` (vit and tiny) or `gpu` (vit, vitl)."""
    available = {
        "ViT-B/32 arch": vit_b32_checkpoint,
        "ViT-L/14 arch": vit_l14_checkpoint,
        "tiny test CLIP": tiny_checkpoint,
    }
    wanted = {
        "vit": ["ViT-B/32 arch"],
        "vitl": ["ViT-L/14 arch"],
        "tiny": ["tiny test CLIP"],
        "both": ["ViT-B/32 arch", "tiny test CLIP"],
        "gpu": ["ViT-B/32 arch", "ViT-L/14 arch"],
    }[choice]
    return {label: available[label]() for label in wanted}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def package_versions() -> str:
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join([f"Python {platform.python_version()}", *versions])


def machine_facts() -> list[str]:
    return [
        f"Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; GPU: {gpu_name()}",
        f"Versions: {package_versions()}",
    ]


def command_line() -> str:
    return "python " + " ".join(shlex.quote(arg) for arg in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[_cell(value) for value in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def report(title: str, tables: Sequence[str], notes: Sequence[str] = (), models_used: str = "") -> None:
    """Print the tables and append them, with the machine facts and the command, to RESULTS.md."""
    facts = machine_facts()
    if models_used:
        facts.insert(1, f"Model: {models_used}")
    section = [f"## {title}", "", f"Command: `{command_line()}`", ""]
    section += [f"- {fact}" for fact in facts] + [""]
    for table in tables:
        section += [table, ""]
    section += [*notes, DRIFT_NOTE, ""]
    text = "\n".join(section)
    print(text)
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in bench/; newest last.\n\n")
    with RESULTS.open("a") as results:
        results.write(text + "\n")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


class Stopwatch:
    """`with Stopwatch() as watch: ...` then `watch.seconds`."""

    def __enter__(self) -> Stopwatch:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.perf_counter() - self.started


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
