"""NetWrapper: read pooled and region features from a named layer of any backbone.

A forward hook is registered on the chosen layer at the start of every ``forward`` and removed in
``finally``: deep copies (teacher = copy of student) never share hook state and nothing stays
registered on the network between calls.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from .backbones.registry import LAYOUTS, POOLS, BackboneSpec

__all__ = ["NetWrapper"]


class _StopForward(Exception):
    """Raised by the hook to skip the layers after the hooked one."""


class NetWrapper(nn.Module):
    """Wrap ``net`` so that ``forward`` returns (pooled, region tokens) of layer ``layer``.

    Args:
        net: The backbone.
        layer: Dotted module name from ``net.named_modules()`` or an int index into
            ``list(net.named_modules())`` (negative indices allowed).
        layout: Layout of the layer output: ``"bchw"`` (CNN map), ``"bhwc"`` (Swin) or
            ``"bnd"`` (ViT tokens).
        pool: ``"avg"`` (mean of region tokens) or ``"cls"`` (first token; ``"bnd"`` only).
        num_prefix_tokens: ``"bnd"`` only: leading tokens excluded from the region tokens.
        stop_after_layer: Abort the backbone's forward right after the hooked layer (saves the
            compute of later layers); if False the backbone runs fully.
    """

    def __init__(
        self,
        net: nn.Module,
        layer: str | int,
        layout: str,
        pool: str = "avg",
        num_prefix_tokens: int = 0,
        stop_after_layer: bool = True,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        if layout != "bnd" and num_prefix_tokens:
            raise ValueError(
                f"num_prefix_tokens must be 0 for layout {layout!r}, got {num_prefix_tokens}"
            )
        if pool == "cls" and (layout != "bnd" or num_prefix_tokens < 1):
            raise ValueError(
                "pool='cls' requires layout='bnd' and num_prefix_tokens >= 1, got "
                f"layout={layout!r}, num_prefix_tokens={num_prefix_tokens}"
            )
        self.net = net
        self.layer = self._resolve_layer(net, layer)
        self.layout = layout
        self.pool = pool
        self.num_prefix_tokens = num_prefix_tokens
        self.stop_after_layer = stop_after_layer

    @staticmethod
    def _resolve_layer(net: nn.Module, layer: str | int) -> str:
        names = [name for name, _ in net.named_modules()]
        if isinstance(layer, bool) or not isinstance(layer, (str, int)):
            raise TypeError(f"layer must be a module name (str) or index (int), got {layer!r}")
        if isinstance(layer, int):
            if not -len(names) <= layer < len(names):
                raise ValueError(
                    f"layer index {layer} out of range for a network with {len(names)} modules "
                    f"(valid: {-len(names)}..{len(names) - 1})"
                )
            return names[layer]
        if layer not in names:
            top = [n for n in names if n and "." not in n]
            raise ValueError(
                f"layer {layer!r} not found in the network; top-level modules: {top[:12]}"
                f"{' ...' if len(top) > 12 else ''} ({len(names)} modules in total)"
            )
        return layer

    @classmethod
    def from_spec(
        cls, net: nn.Module, spec: BackboneSpec, stop_after_layer: bool = True
    ) -> NetWrapper:
        """Build a wrapper from a registry :class:`BackboneSpec`."""
        return cls(
            net,
            spec.layer,
            spec.layout,
            pool=spec.pool,
            num_prefix_tokens=spec.num_prefix_tokens,
            stop_after_layer=stop_after_layer,
        )

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer!r}, layout={self.layout!r}, pool={self.pool!r}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, stop_after_layer={self.stop_after_layer}"
        )

    def _capture(self, x: Tensor) -> Tensor:
        captured: list[Tensor] = []
        stop = self.stop_after_layer

        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, tuple):
                output = output[0]
            captured.append(output)
            if stop:
                raise _StopForward

        handle = self.net.get_submodule(self.layer).register_forward_hook(hook)
        try:
            self.net(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(
                f"layer {self.layer!r} was not called during the forward pass of "
                f"{type(self.net).__name__}"
            )
        out = captured[-1]
        if not isinstance(out, Tensor):
            raise TypeError(
                f"layer {self.layer!r} returned {type(out).__name__}, expected a Tensor"
            )
        return out

    def _split(self, out: Tensor) -> tuple[Tensor, Tensor]:
        expected_ndim = 3 if self.layout == "bnd" else 4
        if out.dim() != expected_ndim:
            raise ValueError(
                f"layer {self.layer!r} output has shape {tuple(out.shape)}, which does not match "
                f"layout {self.layout!r} (expected a {expected_ndim}-D tensor)"
            )
        if self.layout == "bchw":
            regions = rearrange(out, "b c h w -> b (h w) c")
        elif self.layout == "bhwc":
            regions = rearrange(out, "b h w c -> b (h w) c")
        else:
            if out.shape[1] <= self.num_prefix_tokens:
                raise ValueError(
                    f"layer {self.layer!r} output has shape {tuple(out.shape)}: no tokens left "
                    f"after {self.num_prefix_tokens} prefix token(s) (layout 'bnd')"
                )
            regions = out[:, self.num_prefix_tokens :]
            if self.pool == "cls":
                return out[:, 0], regions
        return regions.mean(dim=1), regions

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Run the backbone up to the hooked layer.

        Args:
            x: ``(b, c, h, w)`` images.

        Returns:
            ``pooled (b, d)`` and ``regions (b, n, d)`` (n = spatial positions / patch tokens).
        """
        return self._split(self._capture(x))

    def probe(self, image_size: int, in_chans: int = 3) -> tuple[int, int]:
        """Return ``(dim, n_tokens)`` for square inputs of ``image_size``.

        Runs a no-grad forward of zeros of shape ``(1, in_chans, image_size, image_size)`` in eval
        mode on the module's device; each submodule's training flag is restored afterwards.
        """
        ref = next(self.parameters(), None)
        if ref is None:
            ref = next(self.buffers(), None)
        device = ref.device if ref is not None else None
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else None
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                x = torch.zeros(1, in_chans, image_size, image_size, device=device, dtype=dtype)
                _, regions = self(x)
        finally:
            for m, mode in modes:
                m.training = mode
        return int(regions.shape[-1]), int(regions.shape[1])
