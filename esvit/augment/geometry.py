"""Where a region token of one view lies in another view of the same image.

Every view is a crop box ``(top, left, h, w)`` of the input (``ViewParams.boxes``, in canvas
pixels, possibly fractional), resized to a square and possibly flipped. All views of a sample live
in the same canvas, so correspondences need no knowledge of the letterbox. The token at row ``r``, column ``c`` of a ``g x g`` grid covers the
centre ``((r + 0.5) / g, (c + 0.5) / g)`` of the view, which maps back to input pixels and from
there into any other view. The region loss matches tokens by feature similarity; this geometric
correspondence is what a perfect matching would find, and the trainer reports how often the
feature matching agrees with it (``region_match_accuracy``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["token_centres", "token_correspondence"]


def token_centres(boxes: Tensor, flip: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """Input-pixel coordinates of the token centres of a view.

    Args:
        boxes: ``(b, 4)`` crop boxes ``(top, left, h, w)`` (int or float).
        flip: ``(b,)`` bool, the view is the mirrored crop.
        grid: Side ``g`` of the view's token grid.

    Returns:
        ``(y, x)``, each ``(b, g * g)`` float32, tokens in row-major order.
    """
    top, left, h, w = boxes.float().unbind(1)
    c = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    yy, xx = yy.reshape(1, -1), xx.reshape(1, -1)
    xx = torch.where(flip.view(-1, 1), 1.0 - xx, xx)
    return top[:, None] + yy * h[:, None], left[:, None] + xx * w[:, None]


def token_correspondence(boxes_s: Tensor, flip_s: Tensor, grid_s: int, boxes_t: Tensor, flip_t: Tensor,
                         grid_t: int) -> tuple[Tensor, Tensor]:
    """The token of view ``t`` under the centre of every token of view ``s``.

    Args:
        boxes_s, flip_s, grid_s: Crop boxes ``(b, 4)``, flips ``(b,)`` and grid side of view ``s``.
        boxes_t, flip_t, grid_t: The same for view ``t``.

    Returns:
        ``index`` ``(b, grid_s ** 2)`` long: the row-major token of view ``t`` under each token
        centre of view ``s``; ``inside`` ``(b, grid_s ** 2)`` bool: the centre lies in view
        ``t`` at all (``index`` is clamped to the grid elsewhere).
    """
    y, x = token_centres(boxes_s, flip_s, grid_s)
    top, left, h, w = boxes_t.float().unbind(1)
    yr = (y - top[:, None]) / h[:, None]
    xr = (x - left[:, None]) / w[:, None]
    xr = torch.where(flip_t.view(-1, 1), 1.0 - xr, xr)
    inside = (yr >= 0) & (yr < 1) & (xr >= 0) & (xr < 1)
    r = (yr * grid_t).floor().clamp(0, grid_t - 1).long()
    c = (xr * grid_t).floor().clamp(0, grid_t - 1).long()
    return r * grid_t + c, inside
