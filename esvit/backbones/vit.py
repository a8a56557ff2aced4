"""Variable-resolution Vision Transformer built on torchvision's ``VisionTransformer``.

torchvision's ViT asserts that the input size equals ``image_size``. :class:`FlexibleVisionTransformer`
accepts any input whose height and width are multiples of the patch size by bicubically
interpolating the patch position embeddings (class-token embedding kept as is, like DINO's
``interpolate_pos_encoding``). It adds no parameters or buffers, so its ``state_dict`` has exactly
torchvision's keys and loads into ``torchvision.models.VisionTransformer`` with the same
hyper-parameters; at the native size both compute the same function.

Stochastic depth (``drop_path_rate``) follows the official EsViT / DINO ViT: block ``i`` of ``L``
drops its attention and MLP residual branches per sample with probability
``drop_path_rate * i / (L - 1)`` (``torch.linspace(0, drop_path_rate, L)``) and rescales the kept
ones by ``1 / (1 - p)``. It adds no parameters, so state dicts are unchanged, and it is the
identity in eval mode or at rate 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import VisionTransformer
from torchvision.models.vision_transformer import Encoder, EncoderBlock
from torchvision.ops import StochasticDepth

from .registry import BackboneSpec, register_backbone

__all__ = [
    "DropPathEncoderBlock",
    "FlexibleEncoder",
    "FlexibleVisionTransformer",
    "interpolate_pos_embedding",
    "torchvision_vit",
]


def interpolate_pos_embedding(
    pos_embedding: Tensor, grid_size: tuple[int, int], num_prefix_tokens: int = 1
) -> Tensor:
    """Resize a square grid of position embeddings to ``grid_size`` (bicubic).

    Args:
        pos_embedding: ``(1, num_prefix_tokens + g * g, d)`` embeddings of a ``g x g`` grid.
        grid_size: Target ``(grid_h, grid_w)``.
        num_prefix_tokens: Leading (class) token embeddings, copied unchanged.

    Returns:
        ``(1, num_prefix_tokens + grid_h * grid_w, d)``; ``pos_embedding`` itself when the grid
        already matches.
    """
    prefix = pos_embedding[:, :num_prefix_tokens]
    patch = pos_embedding[:, num_prefix_tokens:]
    n, d = patch.shape[1], patch.shape[2]
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"position embeddings must form a square grid, got {n} patch positions")
    gh, gw = grid_size
    if (gh, gw) == (g, g):
        return pos_embedding
    grid = patch.reshape(1, g, g, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False)
    patch = grid.to(pos_embedding.dtype).permute(0, 2, 3, 1).reshape(1, gh * gw, d)
    return torch.cat([prefix, patch], dim=1)


class DropPathEncoderBlock(EncoderBlock):
    """torchvision ``EncoderBlock`` with per-sample stochastic depth on both residual branches.

    Same parameters and state_dict keys as ``EncoderBlock``; ``stochastic_depth`` (a parameterless
    ``torchvision.ops.StochasticDepth(p, "row")``) is applied to the attention and the MLP branch
    before each residual sum, as DINO's ``Block`` applies its ``DropPath``. At ``p = 0`` or in eval
    mode it computes exactly what ``EncoderBlock`` computes.
    """

    stochastic_depth: StochasticDepth

    def forward(self, input: Tensor) -> Tensor:
        """Args: input: ``(b, n, d)`` tokens. Returns: ``(b, n, d)`` tokens."""
        if input.dim() != 3:
            raise ValueError(f"expected (batch_size, seq_length, hidden_dim) got {tuple(input.shape)}")
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.stochastic_depth(self.dropout(x)) + input
        y = self.mlp(self.ln_2(x))
        return x + self.stochastic_depth(y)


def set_drop_path_rate(encoder: Encoder, drop_path_rate: float) -> None:
    """Give the blocks of ``encoder`` stochastic depth, linearly increasing from 0 to the rate.

    Swaps each ``EncoderBlock`` to :class:`DropPathEncoderBlock` in place (no new state).

    Args:
        encoder: A torchvision ViT ``Encoder`` (``encoder.layers`` holds the blocks).
        drop_path_rate: Rate of the last block, in ``[0, 1)``.
    """
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    blocks = list(encoder.layers)
    rates = torch.linspace(0, drop_path_rate, len(blocks)).tolist()
    for block, rate in zip(blocks, rates, strict=True):
        if not isinstance(block, EncoderBlock):
            raise TypeError(f"expected torchvision EncoderBlocks, got {type(block).__name__}")
        block.__class__ = DropPathEncoderBlock
        block.stochastic_depth = StochasticDepth(rate, "row")


class FlexibleEncoder(Encoder):
    """torchvision ``Encoder`` whose position embeddings adapt to the token grid.

    Same parameters and state_dict keys as ``Encoder`` (``pos_embedding``, ``layers``, ``ln``).
    """

    def forward(self, input: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
        """Encode tokens.

        Args:
            input: ``(b, 1 + grid_h * grid_w, d)`` tokens, class token first.
            grid_size: ``(grid_h, grid_w)`` of the patch tokens; inferred as square if None.

        Returns:
            ``(b, 1 + grid_h * grid_w, d)`` normalised tokens.
        """
        if input.dim() != 3:
            raise ValueError(
                f"expected (batch_size, seq_length, hidden_dim) tokens, got shape {tuple(input.shape)}"
            )
        n = input.shape[1] - 1
        if grid_size is None:
            g = math.isqrt(n)
            if g * g != n:
                raise ValueError(
                    f"cannot infer a square token grid from {n} patch tokens; pass grid_size"
                )
            grid_size = (g, g)
        if grid_size[0] * grid_size[1] != n:
            raise ValueError(f"grid_size {grid_size} does not match {n} patch tokens")
        pos = interpolate_pos_embedding(self.pos_embedding, grid_size, num_prefix_tokens=1)
        x = input + pos
        return self.ln(self.layers(self.dropout(x)))


class FlexibleVisionTransformer(VisionTransformer):
    """torchvision ``VisionTransformer`` accepting any input size that is a multiple of the patch.

    Constructor arguments are those of ``torchvision.models.VisionTransformer``; ``image_size``
    fixes the native position-embedding grid. ``forward`` returns ``self.heads(cls_token)`` like
    torchvision; the full token sequence ``(b, 1 + n, d)`` is the output of ``self.encoder``.
    The extra keyword ``drop_path_rate`` (default 0) sets the stochastic depth of the blocks
    (:func:`set_drop_path_rate`).
    """

    def __init__(self, *args: object, drop_path_rate: float = 0.0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        # Same state as torchvision's Encoder; only forward differs, so swap the class in place
        # (avoids re-initialising the encoder and keeps torchvision's init and RNG use).
        self.encoder.__class__ = FlexibleEncoder
        self.drop_path_rate = float(drop_path_rate)
        set_drop_path_rate(self.encoder, self.drop_path_rate)

    def _process_input(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected images of shape (b, c, h, w), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"input size {h}x{w} must be a multiple of the patch size {p} "
                f"(e.g. {max(p, h // p * p)}x{max(p, w // p * p)})"
            )
        x = self.conv_proj(x)  # (b, d, h/p, w/p)
        return x.flatten(2).transpose(1, 2)  # (b, n, d)

    def forward(self, x: Tensor) -> Tensor:
        """Classify (or embed, with ``heads = Identity``) images.

        Args:
            x: ``(b, 3, h, w)`` images; h and w must be multiples of the patch size.

        Returns:
            ``self.heads`` applied to the final class token, ``(b, d)`` when headless.
        """
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        x = self._process_input(x)
        cls = self.class_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = self.encoder(x, grid_size=grid)
        return self.heads(x[:, 0])


def _check_image_size(image_size: int, patch_size: int) -> None:
    if image_size <= 0 or image_size % patch_size:
        raise ValueError(
            f"image_size must be a positive multiple of the patch size {patch_size}, got {image_size}"
        )


def _vit(
    cls: type[VisionTransformer],
    image_size: int,
    patch_size: int,
    depth: int,
    num_heads: int,
    dim: int,
    mlp_dim: int,
    **extra: float,
) -> VisionTransformer:
    _check_image_size(image_size, patch_size)
    net = cls(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=depth,
        num_heads=num_heads,
        hidden_dim=dim,
        mlp_dim=mlp_dim,
        **extra,
    )
    net.heads = nn.Identity()
    return net


def torchvision_vit(
    image_size: int, patch_size: int, depth: int, num_heads: int, dim: int, mlp_dim: int
) -> VisionTransformer:
    """Plain ``torchvision.models.VisionTransformer`` (heads = Identity) with these settings."""
    return _vit(VisionTransformer, image_size, patch_size, depth, num_heads, dim, mlp_dim)


def flexible_vit(
    name: str, image_size: int, patch_size: int, depth: int, num_heads: int, dim: int, mlp_dim: int,
    drop_path_rate: float = 0.0,
) -> tuple[nn.Module, BackboneSpec]:
    """Build a :class:`FlexibleVisionTransformer` (heads = Identity) and its spec.

    ``drop_path_rate`` is the stochastic depth of the last block (linear from 0; official 0.1).
    """
    net = _vit(FlexibleVisionTransformer, image_size, patch_size, depth, num_heads, dim, mlp_dim,
               drop_path_rate=drop_path_rate)
    spec = BackboneSpec(
        name=name,
        layer="encoder",
        layout="bnd",
        num_prefix_tokens=1,
        pool="cls",
        embed_dim=dim,
        export_ctor="torchvision.models.VisionTransformer",
    )
    return net, spec


def _check_depth(depth: int) -> None:
    if not 1 <= depth <= 24:
        raise ValueError(f"depth must be in [1, 24] (6-12 for the standard ViT-tiny/small), got {depth}")


# The ViT factories take ``drop_path_rate`` (stochastic depth of the last block, default 0: the
# shipped CIFAR recipes were measured without it; the official ImageNet students use 0.1). Their
# torchvision equivalents accept it too (they are called with the same kwargs) and ignore it:
# stochastic depth only acts in training, so the function computed in eval mode is the same.


def _vit_tiny_equivalent(
    image_size: int = 32, depth: int = 12, patch_size: int = 4, drop_path_rate: float = 0.0
) -> nn.Module:
    _check_depth(depth)
    return torchvision_vit(image_size, patch_size, depth, 3, 192, 768)


@register_backbone("vit_tiny", equivalent=_vit_tiny_equivalent)
def vit_tiny(
    image_size: int = 32, depth: int = 12, patch_size: int = 4, drop_path_rate: float = 0.0
) -> tuple[nn.Module, BackboneSpec]:
    """ViT-Tiny for small images: patch 4, dim 192, 3 heads, MLP 768, ``depth`` in [1, 24] (6-12 standard)."""
    _check_depth(depth)
    return flexible_vit("vit_tiny", image_size, patch_size, depth, 3, 192, 768, drop_path_rate)


def _vit_small_cifar_equivalent(
    image_size: int = 32, depth: int = 12, patch_size: int = 4, drop_path_rate: float = 0.0
) -> nn.Module:
    _check_depth(depth)
    return torchvision_vit(image_size, patch_size, depth, 6, 384, 1536)


@register_backbone("vit_small_cifar", equivalent=_vit_small_cifar_equivalent)
def vit_small_cifar(
    image_size: int = 32, depth: int = 12, patch_size: int = 4, drop_path_rate: float = 0.0
) -> tuple[nn.Module, BackboneSpec]:
    """ViT-Small for small images: patch 4, dim 384, 6 heads, MLP 1536, ``depth`` in [1, 24] (6-12 standard)."""
    _check_depth(depth)
    return flexible_vit("vit_small_cifar", image_size, patch_size, depth, 6, 384, 1536, drop_path_rate)


def _vit_nano_equivalent(
    image_size: int = 32, depth: int = 2, patch_size: int = 8, drop_path_rate: float = 0.0
) -> nn.Module:
    _check_depth(depth)
    return torchvision_vit(image_size, patch_size, depth, 2, 64, 128)


@register_backbone("vit_nano", equivalent=_vit_nano_equivalent)
def vit_nano(
    image_size: int = 32, depth: int = 2, patch_size: int = 8, drop_path_rate: float = 0.0
) -> tuple[nn.Module, BackboneSpec]:
    """A very small ViT (patch 8, dim 64, 2 heads, MLP 128): smoke tests, debug runs and the
    CPU-budget CIFAR-10 quality benchmark (`configs/cifar10_vit_nano.yaml`)."""
    _check_depth(depth)
    return flexible_vit("vit_nano", image_size, patch_size, depth, 2, 64, 128, drop_path_rate)


def _vit_small_equivalent(image_size: int = 224, patch_size: int = 16, drop_path_rate: float = 0.1) -> nn.Module:
    return torchvision_vit(image_size, patch_size, 12, 6, 384, 1536)


@register_backbone("vit_small", equivalent=_vit_small_equivalent)
def vit_small(
    image_size: int = 224, patch_size: int = 16, drop_path_rate: float = 0.1
) -> tuple[nn.Module, BackboneSpec]:
    """ViT-S/16 (DeiT-S): patch 16, dim 384, depth 12, 6 heads, MLP 1536, CLS pooling; the
    official EsViT / DINO ``deit_small``. ``drop_path_rate`` defaults to 0.1, the official
    student's stochastic depth (``main_esvit.py``)."""
    return flexible_vit("vit_small", image_size, patch_size, 12, 6, 384, 1536, drop_path_rate)
