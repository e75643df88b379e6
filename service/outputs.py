"""Where a render's images go, torch-free: the file names and the grid layout.

The local command (``featureviz.engine.images.save_images``, tensors) and ``render --server``
(``featureviz.cli.remote``, PNG bytes from the server) write the same files from this one layout.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["output_paths", "grid_layout", "GRID_PAD"]

GRID_PAD = 2  # pixels of white between the images of a grid and around them


def output_paths(out: str | os.PathLike, count: int, *, as_grid: bool = False) -> list[Path]:
    """The files for ``count`` images: ``OUT.png`` alone for one image or a grid, else ``OUT_0.png``,
    ``OUT_1.png`` ... (``.png`` added when ``out`` has another suffix or none). Makes the folder."""
    path = Path(out)
    if path.suffix.lower() != ".png":
        path = path.with_suffix(path.suffix + ".png") if path.suffix else path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    if count == 1 or as_grid:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(count)]


def grid_layout(count: int, height: int, width: int, *, columns: int | None = None,
                pad: int = GRID_PAD) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """A grid of ``count`` images of ``height`` x ``width``: rows of ``columns`` (default: about square) with
    ``pad`` pixels between and around them. Returns the sheet's (height, width) and each image's (top, left)."""
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    size = (rows * (height + pad) + pad, columns * (width + pad) + pad)
    places = [(pad + r * (height + pad), pad + k * (width + pad)) for r, k in (divmod(i, columns) for i in range(count))]
    return size, places
