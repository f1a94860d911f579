"""Where an image matches a query: a coarse heat map from the query's score on windows of the image.

The image is cut into a `grid` x `grid` lattice of cells. Windows slide over it one cell at a time:
quarters (half the width and half the height), upright halves and lying halves. Each window is scaled
to the model's input (the whole window, no centre crop) and all of them go through the image encoder in
one batch together with the whole image. A cell's score is the best score of the windows that contain
it (the best-matching region around it); its heat is that score rescaled so that the coolest cell is 0
and the warmest 1 (all 0 when every window scores the same).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from clip_encoder import ClipEncoder

DEFAULT_GRID = 6
MIN_GRID = 2
MAX_GRID = 12


@dataclass(frozen=True)
class Explanation:
    """Heat per cell (rows of the image, top first), the cells' scores and the whole image's score."""

    grid: int
    heat: list[list[float]]
    scores: list[list[float]]
    score: float
    windows: int
    milliseconds: float

    def as_dict(self) -> dict[str, object]:
        return {
            "grid": self.grid,
            "heat": self.heat,
            "scores": self.scores,
            "score": round(self.score, 6),
            "windows": self.windows,
            "ms": round(self.milliseconds, 1),
        }


def window_spans(grid: int) -> list[tuple[int, int]]:
    """The (columns, rows) sizes of the windows in cells: quarters, then upright and lying halves."""
    half = grid // 2
    return [(half, half), (half, grid), (grid, half)]


def windows(grid: int) -> list[tuple[int, int, int, int]]:
    """Every window as (first column, first row, columns, rows) in cells, one cell apart."""
    found = []
    for columns, rows in window_spans(grid):
        for row in range(grid - rows + 1):
            for col in range(grid - columns + 1):
                found.append((col, row, columns, rows))
    return found


def pixel_box(
    window: tuple[int, int, int, int], width: int, height: int, grid: int
) -> tuple[int, int, int, int]:
    col, row, columns, rows = window
    return (
        round(col * width / grid),
        round(row * height / grid),
        round((col + columns) * width / grid),
        round((row + rows) * height / grid),
    )


def heat_map(
    encoder: ClipEncoder, image: Image.Image, vector: np.ndarray, grid: int = DEFAULT_GRID
) -> Explanation:
    """The heat map of `vector` (normalised, the model's dimension) over `image` (RGB)."""
    import torch  # loaded with the model already; importing this module stays light (api.py --help)

    started = time.perf_counter()
    side = encoder.input_resolution
    placed = windows(grid)
    boxes = [pixel_box(window, image.width, image.height, grid) for window in placed]
    views = [image.crop(box).resize((side, side), Image.Resampling.BICUBIC) for box in boxes]
    pixels = [encoder.preprocess_image(view) for view in [image, *views]]
    encoded = encoder.encode_pixels(torch.stack(pixels))
    scores = encoded @ np.asarray(vector, dtype=np.float32)
    best = _cell_best(placed, scores[1:], grid)
    return Explanation(
        grid=grid,
        heat=_rounded(_rescaled(best)),
        scores=_rounded(best),
        score=float(scores[0]),
        windows=len(boxes),
        milliseconds=(time.perf_counter() - started) * 1000,
    )


def _cell_best(placed: list[tuple[int, int, int, int]], window_scores: np.ndarray, grid: int) -> np.ndarray:
    """Each cell's best score over the windows that contain it."""
    best = np.full((grid, grid), -np.inf, dtype=np.float64)
    for (col, row, columns, rows), score in zip(placed, window_scores, strict=True):
        region = best[row : row + rows, col : col + columns]
        np.maximum(region, score, out=region)
    return best


def _rescaled(cells: np.ndarray) -> np.ndarray:
    low, high = float(cells.min()), float(cells.max())
    if high - low < 1e-9:
        return np.zeros_like(cells)
    return (cells - low) / (high - low)


def _rounded(cells: np.ndarray) -> list[list[float]]:
    return [[round(float(value), 4) for value in row] for row in cells]
