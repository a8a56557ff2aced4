"""Attention picture: where the image-level feature looks.

* **ViT backbones** (torchvision ``EncoderBlock`` s, a CLS token): the CLS token's attention to
  every patch in the last block, one map per head (the official ``--vis_attention`` and DINO's
  attention maps). torchvision calls ``nn.MultiheadAttention`` with ``need_weights=False``, so the
  block's normalised input is captured with a forward pre-hook and the same module is called
  again with ``need_weights=True, average_attn_weights=False``: the weights are the softmax rows
  the block used (each sums to one over the ``1 + n`` tokens; the map shows the ``n`` patch
  columns).
* **Other backbones** (CNN, Swin): the cosine similarity of the pooled feature to every region
  token, one map.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from esvit.viz.inputs import load_model, load_views

__all__ = [
    "ATTENTION_METHODS",
    "AttentionMaps",
    "attention_blocks",
    "cls_attention_maps",
    "compute_attention",
    "draw_attention",
    "last_block_attention",
    "plot_attention",
    "pooled_similarity",
]

#: ``auto``: CLS attention for ViTs, pooled similarity otherwise.
ATTENTION_METHODS = ("auto", "cls_attention", "pooled_similarity")


class _Stop(Exception):
    """Raised by the pre-hook: nothing after the last block's attention is needed."""


@dataclass
class AttentionMaps:
    """Attention (or similarity) maps of one image.

    Attributes:
        image: ``(3, s, s)`` the image as fed (float in ``[0, 1]``).
        maps: ``(heads, gh, gw)``: per head, the CLS token's attention to every patch; or
            ``(1, gh, gw)`` cosine similarity of the pooled feature to every region.
        method: ``"cls_attention"`` or ``"pooled_similarity"``.
        attention: ``cls_attention`` only: the last block's full weights ``(heads, L, L)``
            (``L = prefix tokens + n``), rows summing to one.
        backbone: Registry name.
        png: The picture, once written.
    """

    image: Tensor
    maps: Tensor
    method: str
    attention: Tensor | None = None
    backbone: str = ""
    png: Path | None = None


def attention_blocks(net: nn.Module) -> list[nn.Module]:
    """The torchvision ViT ``EncoderBlock`` s of ``net`` in forward order (empty if none)."""
    from torchvision.models.vision_transformer import EncoderBlock

    return [m for m in net.modules() if isinstance(m, EncoderBlock)]


@torch.no_grad()
def last_block_attention(net: nn.Module, x: Tensor) -> Tensor:
    """Self-attention weights of the last ``EncoderBlock`` of a torchvision-style ViT.

    Args:
        net: The ViT (eval mode, so attention dropout is off).
        x: Normalised images ``(b, 3, h, w)``.

    Returns:
        ``(b, heads, L, L)`` softmax weights (row ``i``: how token ``i`` attends to every token).
    """
    blocks = attention_blocks(net)
    if not blocks:
        raise ValueError(f"{type(net).__name__} has no torchvision EncoderBlock: no CLS attention to show")
    mha = blocks[-1].self_attention
    captured: list[Tensor] = []

    def pre_hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["query"])
        raise _Stop

    handle = mha.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        net(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the last EncoderBlock's attention was not called during the forward pass")
    q = captured[0]
    _, weights = mha(q, q, q, need_weights=True, average_attn_weights=False)
    return weights.float()


def cls_attention_maps(attention: Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1) -> Tensor:
    """The CLS token's attention to the patch tokens, as grids.

    Args:
        attention: ``(b, heads, L, L)`` weights, ``L = num_prefix_tokens + gh * gw``.
        grid: ``(gh, gw)``.
        num_prefix_tokens: Leading non-patch tokens (CLS first).

    Returns:
        ``(b, heads, gh, gw)``.
    """
    length = attention.shape[2]
    if length != num_prefix_tokens + grid[0] * grid[1]:
        raise ValueError(f"{length} tokens do not match {num_prefix_tokens} prefix + grid {grid}")
    return rearrange(attention[:, :, 0, num_prefix_tokens:], "b heads (gh gw) -> b heads gh gw", gh=grid[0])


def pooled_similarity(pooled: Tensor, regions: Tensor, grid: tuple[int, int]) -> Tensor:
    """Cosine similarity of the pooled feature to every region token.

    Args:
        pooled: ``(b, d)``.
        regions: ``(b, n, d)``, row-major grid order.
        grid: ``(gh, gw)`` with ``gh * gw == n``.

    Returns:
        ``(b, 1, gh, gw)`` in ``[-1, 1]``.
    """
    sim = torch.einsum("bd,bnd->bn", F.normalize(pooled.float(), dim=-1), F.normalize(regions.float(), dim=-1))
    return rearrange(sim, "b (gh gw) -> b 1 gh gw", gh=grid[0])


def compute_attention(
    backbone: Any,
    image: str | os.PathLike[str],
    *,
    method: str = "auto",
    image_size: int | None = None,
    checkpoint_key: str = "teacher",
    backbone_name: str | None = None,
    device: str | torch.device | None = "cpu",
) -> AttentionMaps:
    """Attention maps (ViT) or pooled-to-region similarity (other backbones) of one image.

    Args:
        backbone: Checkpoint path (any esvit format) or ``(net, spec)``.
        image: Image file.
        method: One of :data:`ATTENTION_METHODS`.
        image_size, checkpoint_key, backbone_name, device: As for
            :func:`esvit.viz.inputs.load_model`.

    Returns:
        :class:`AttentionMaps`.
    """
    if method not in ATTENTION_METHODS:
        raise ValueError(f"method must be one of {ATTENTION_METHODS}, got {method!r}")
    model = load_model(backbone, image_size=image_size, checkpoint_key=checkpoint_key,
                       backbone_name=backbone_name, device=device)
    net, prefix = model.wrapper.net, model.spec.num_prefix_tokens
    is_vit = bool(attention_blocks(net)) and prefix >= 1
    if method == "auto":
        method = "cls_attention" if is_vit else "pooled_similarity"
    elif method == "cls_attention" and not is_vit:
        raise ValueError(f"backbone {model.name!r} is not a ViT with a CLS token (no torchvision "
                         "EncoderBlock): use method pooled_similarity")
    x = load_views([image], model)
    if method == "pooled_similarity":
        pooled, regions = model.features(x)
        return AttentionMaps(x[0], pooled_similarity(pooled, regions, model.grid)[0], method, None, model.name)
    from esvit.eval.features import normalize

    attn = last_block_attention(net, normalize(x.to(model.device))).cpu()
    maps = cls_attention_maps(attn, model.grid, prefix)
    return AttentionMaps(x[0], maps[0], method, attn[0], model.name)


def draw_attention(res: AttentionMaps) -> Any:
    """Draw the image and one heat map per head (or the similarity map) over it.

    Returns:
        A matplotlib figure.
    """
    from esvit.viz.render import grid_to_pixels, image_panel, pyplot, to_hwc

    plt = pyplot()
    image = to_hwc(res.image)
    size = image.shape[0]
    n = res.maps.shape[0]
    fig, axes = plt.subplots(1, n + 1, figsize=(2.4 * (n + 1), 2.8), squeeze=False)
    image_panel(axes[0, 0], image, "image")
    what = "CLS attention, head {}" if res.method == "cls_attention" else "cosine(pooled, region)"
    for h in range(n):
        ax = axes[0, h + 1]
        image_panel(ax, image, what.format(h))
        heat = ax.imshow(grid_to_pixels(res.maps[h].numpy(), size), cmap="inferno", alpha=0.7,
                         interpolation="nearest")
        fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.02)
    layer = "last block" if res.method == "cls_attention" else "pooled feature vs regions"
    fig.suptitle(f"{res.backbone}: {layer}", fontsize=10)
    return fig


def plot_attention(backbone: Any, image: str | os.PathLike[str], out: str | os.PathLike[str],
                   **kwargs: Any) -> AttentionMaps:
    """Compute (:func:`compute_attention`, ``**kwargs``) and write the PNG ``out``."""
    from esvit.viz.render import save_figure

    res = compute_attention(backbone, image, **kwargs)
    res.png = save_figure(draw_attention(res), out)
    return res
