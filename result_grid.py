"""Matplotlib grids of search results: one thumbnail per cell, saved as PNG, shown when there is a display.

The layout is fixed in pixels so that a saved grid can be checked: a heading band of `HEADING_PX`,
then `rows x columns` cells of `CELL_PX` square, filled row by row; each cell holds its title in a
band of `TITLE_PX` and the thumbnail in the `image_box` below it (scaled to fit, top-centred).
Unused cells stay white.
The titles and the layout are also written into the PNG's text chunk `Grid` (JSON).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import re
import sys
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

from image_io import ImageLoadError, thumbnail_jpeg


def has_display() -> bool:
    """Whether a window can be shown (always on macOS and Windows; X11 or Wayland elsewhere)."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


if not has_display():
    matplotlib.use("Agg")

from matplotlib.backends import BackendFilter, backend_registry  # noqa: E402 - after the backend is chosen
from matplotlib.figure import Figure  # noqa: E402

log = logging.getLogger(__name__)

DPI = 100
CELL_PX = 240
TITLE_PX = 24
HEADING_PX = 32
PAD_PX = 6
MAX_COLUMNS = 5
MAX_SLUG_CHARS = 40
PLACEHOLDER_GREY = 210


@dataclass(frozen=True)
class GridCell:
    title: str
    image: Path | None


@dataclass(frozen=True)
class GridLayout:
    rows: int
    columns: int

    @classmethod
    def for_count(cls, count: int) -> GridLayout:
        columns = max(1, min(count, MAX_COLUMNS))
        return cls(rows=max(1, math.ceil(count / columns)), columns=columns)

    @property
    def size_px(self) -> tuple[int, int]:
        """(width, height) of the saved PNG."""
        return self.columns * CELL_PX, HEADING_PX + self.rows * CELL_PX

    def image_box(self, index: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) pixels of the area that holds cell `index`'s thumbnail."""
        left = (index % self.columns) * CELL_PX
        top = HEADING_PX + (index // self.columns) * CELL_PX
        return left + PAD_PX, top + TITLE_PX, left + CELL_PX - PAD_PX, top + CELL_PX - PAD_PX


@functools.cache
def can_show() -> bool:
    """Whether grids open in a window: a display, and a GUI backend that matplotlib could start on it."""
    interactive = backend_registry.list_builtin(BackendFilter.INTERACTIVE)
    return has_display() and matplotlib.get_backend().lower() in interactive


def grid_file_name(label: str, now: datetime | None = None) -> str:
    """`<slug of the query>-<timestamp to the millisecond>.png`."""
    ascii_label = unicodedata.normalize("NFKD", label).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_label.lower()).strip("-")[:MAX_SLUG_CHARS].strip("-")
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S-%f")[:-3]
    return f"{slug or 'search'}-{stamp}.png"


def save_grid(
    cells: list[GridCell],
    heading: str,
    folder: Path,
    label: str,
    thumbnail_size: int,
    max_megapixels: float,
) -> Path:
    """Draw the cells into a grid, save it as a new PNG in `folder`, show it if possible; the PNG's path."""
    layout = GridLayout.for_count(len(cells))
    figure = _new_figure(layout)
    figure.text(0.5, 1 - HEADING_PX / 2 / layout.size_px[1], heading, ha="center", va="center", fontsize=11)
    for index, cell in enumerate(cells):
        _draw_cell(figure, layout, index, cell, _thumbnail(cell.image, thumbnail_size, max_megapixels))
    folder.mkdir(parents=True, exist_ok=True)
    path = _unused_path(folder, grid_file_name(label))
    metadata = {"Title": heading, "Grid": json.dumps(_description(layout, cells))}
    figure.savefig(path, dpi=DPI, facecolor="white", metadata=metadata)
    if can_show():
        _show(figure)
    return path


def _new_figure(layout: GridLayout) -> Figure:
    width, height = layout.size_px
    size = (width / DPI, height / DPI)
    if can_show():
        import matplotlib.pyplot as plt

        return plt.figure(figsize=size, dpi=DPI, facecolor="white")
    return Figure(figsize=size, dpi=DPI, facecolor="white")


def _draw_cell(figure: Figure, layout: GridLayout, index: int, cell: GridCell, pixels: np.ndarray) -> None:
    width, height = layout.size_px
    left, top, right, bottom = layout.image_box(index)
    axes = figure.add_axes(
        (left / width, 1 - bottom / height, (right - left) / width, (bottom - top) / height)
    )
    axes.imshow(pixels, interpolation="antialiased")
    axes.set_anchor("N")
    axes.set_axis_off()
    if pixels.shape[:2] == (1, 1):
        axes.text(0.5, 0.5, "cannot read the image", ha="center", va="center", transform=axes.transAxes)
    title_y = 1 - (top - TITLE_PX / 2) / height
    figure.text((left + right) / 2 / width, title_y, _fit(cell.title), ha="center", va="center", fontsize=9)


def _thumbnail(image: Path | None, size: int, max_megapixels: float) -> np.ndarray:
    """The thumbnail's RGB pixels, or a single grey pixel (drawn as a grey cell) if it cannot be read."""
    if image is not None:
        try:
            return np.asarray(Image.open(io.BytesIO(thumbnail_jpeg(image, size, max_megapixels))))
        except (ImageLoadError, OSError) as error:
            log.warning("cannot draw %s: %s", image, error)
    return np.full((1, 1, 3), PLACEHOLDER_GREY, dtype=np.uint8)


def _fit(title: str, limit: int = 34) -> str:
    return title if len(title) <= limit else title[: limit - 1] + "…"


def _unused_path(folder: Path, name: str) -> Path:
    path = folder / name
    counter = 2
    while path.exists():
        path = folder / f"{Path(name).stem}-{counter}.png"
        counter += 1
    return path


def _description(layout: GridLayout, cells: list[GridCell]) -> dict[str, object]:
    return {"rows": layout.rows, "columns": layout.columns, "titles": [cell.title for cell in cells]}


def _show(figure: Figure) -> None:
    """Open the grid in a window without blocking the prompt; a failing GUI backend only logs."""
    import matplotlib.pyplot as plt

    try:
        figure.show()
        plt.pause(0.001)
    except Exception as error:
        log.warning("cannot show the grid window: %s", error)
