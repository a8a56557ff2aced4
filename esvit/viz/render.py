"""Shared matplotlib helpers of :mod:`esvit.viz`: the optional import, image panels, PNG output.

matplotlib is an optional dependency (``pip install 'esvit[viz]'``). Only the drawing functions
need it; every computation in :mod:`esvit.viz` is plain torch / numpy. The Agg backend is used
(unless the caller already chose a backend), so pictures are written without a display.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

__all__ = [
    "MissingDependencyError",
    "grid_to_pixels",
    "image_panel",
    "pyplot",
    "save_figure",
    "to_hwc",
]


class MissingDependencyError(RuntimeError):
    """An optional package needed for a picture is not installed (the message says which)."""


def pyplot() -> Any:
    """``matplotlib.pyplot``, on the Agg backend unless the caller already chose one.

    Agg is selected when pyplot has not been imported yet and ``MPLBACKEND`` is unset (the CLI,
    scripts); a notebook or script that set up its own backend keeps it.

    Raises:
        MissingDependencyError: matplotlib is not installed (names the ``viz`` extra).
    """
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(
            "esvit-viz needs matplotlib: pip install 'esvit[viz]' (or pip install matplotlib)"
        ) from None
    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_hwc(image: Tensor | np.ndarray) -> np.ndarray:
    """An image for ``imshow``.

    Args:
        image: ``(3, h, w)`` float in ``[0, 1]`` or uint8 tensor / array, or ``(h, w, 3)``.

    Returns:
        ``(h, w, 3)`` float32 array in ``[0, 1]``.
    """
    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    arr = arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.clip(arr, 0.0, 1.0)


def grid_to_pixels(grid_map: np.ndarray, size: int) -> np.ndarray:
    """Blow a token-grid map up to the image (nearest neighbour: one block per region).

    Args:
        grid_map: ``(gh, gw)`` or ``(gh, gw, c)`` values, one per region token.
        size: Side of the square image, in pixels.

    Returns:
        ``(size, size)`` or ``(size, size, c)``: each pixel takes its region's value.
    """
    gh, gw = grid_map.shape[:2]
    rows = np.minimum(np.arange(size) * gh // size, gh - 1)
    cols = np.minimum(np.arange(size) * gw // size, gw - 1)
    return grid_map[rows][:, cols]


def image_panel(ax: Any, image: np.ndarray, title: str | None = None) -> None:
    """Show ``image`` ``(h, w, 3)`` on ``ax`` without ticks, in a thin grey frame."""
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("0.7")
        spine.set_linewidth(0.5)
    if title:
        ax.set_title(title, fontsize=9)


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_figure(fig: Any, out: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG atomically (temporary file + rename) and close it.

    Args:
        fig: A matplotlib figure.
        out: Output path (parent folders are created; a ``.png`` suffix is expected).
        dpi: Resolution.

    Returns:
        The written path.
    """
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise ValueError(f"pictures are PNG files: {path} does not end in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600 files; pictures follow the umask
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        pyplot().close(fig)
    return path
