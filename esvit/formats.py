"""Standard files back: a backbone as safetensors, a plain ``.pt`` state dict, ONNX or TorchScript,
each with a small JSON card beside it.

The card (``<file>.json``) says how to rebuild and feed the network without esvit: the
constructor and its arguments (``torchvision.models.resnet18()``, ``timm.create_model(name,
num_classes=0)``, or esvit's registry name), the training resolution, the normalisation and the
evaluation protocol (resize the short side to ``image_size / 0.875``, centre-crop ``image_size``).
The ``.pt`` file is a plain state dict: ``net.load_state_dict(torch.load(f, weights_only=True),
strict=True)`` works on the matching torchvision / timm model. ONNX exports are checked with
``onnx.checker`` and, where onnxruntime is installed, against PyTorch's outputs; TorchScript
exports are traced and compared.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from esvit.augment import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["CARD_FORMAT", "EXTENSIONS", "FORMATS", "backbone_card", "card_path", "format_for", "load_safetensors",
           "read_card", "write_backbone"]

FORMATS = ("safetensors", "pt", "onnx", "torchscript")
EXTENSIONS = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt", ".onnx": "onnx", ".ts": "torchscript",
              ".torchscript": "torchscript"}
CARD_FORMAT = "esvit-backbone-card"


def format_for(out: str | Path, fmt: str | None = None) -> str:
    """The export format of ``out``: ``fmt`` when given (it must match the extension), else the
    extension's.

    Raises:
        ValueError: unknown format or extension, or a mismatch (one line naming both).
    """
    ext = Path(out).suffix.lower()
    by_ext = EXTENSIONS.get(ext)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if by_ext is None:
        raise ValueError(f"{out}: unknown extension {ext or '(none)'!r}; use one of {', '.join(EXTENSIONS)}")
    if fmt is not None and fmt != by_ext:
        raise ValueError(f"{out}: --format {fmt} does not match the extension {ext} ({by_ext}); "
                         f"name the file {Path(out).stem}{_first_ext(fmt)}")
    return by_ext


def _first_ext(fmt: str) -> str:
    return next(e for e, f in EXTENSIONS.items() if f == fmt)


def card_path(out: str | Path) -> Path:
    """The JSON card written beside an export: ``backbone.safetensors`` -> ``backbone.json``."""
    return Path(out).with_suffix(".json")


def _constructor(name: str, export_ctor: str | None, kwargs: Mapping[str, Any]) -> str:
    if name.startswith("timm/"):
        return f"timm.create_model({name[5:]!r}, num_classes=0)"
    if name.startswith("torchvision/"):
        return f"torchvision.models.get_model({name[12:]!r}, weights=None) with its classifier set to Identity"
    if export_ctor:
        return f"{export_ctor}(...) with its classifier set to Identity (esvit.backbones.torchvision_equivalent)"
    return f"esvit.backbones.build_backbone({name!r}, **backbone_kwargs)"


def backbone_card(name: str, kwargs: Mapping[str, Any], export_ctor: str | None, image_size: int | None,
                  weights: str, fmt: str, checkpoint_key: str | None = None) -> dict[str, Any]:
    """The JSON card of an exported backbone (see the module docstring)."""
    size = int(image_size or 224)
    return {
        "format": CARD_FORMAT, "format_version": 1, "weights": weights, "file_format": fmt,
        "backbone": name, "backbone_kwargs": dict(kwargs), "constructor": _constructor(name, export_ctor, kwargs),
        "image_size": image_size, "checkpoint_key": checkpoint_key,
        "input": {"channels": "RGB", "range": "[0, 1] then normalised", "mean": list(IMAGENET_MEAN),
                  "std": list(IMAGENET_STD)},
        "eval_protocol": {"resize_short_side": round(size / 0.875), "center_crop": size, "interpolation": "bicubic"},
        "output": "pooled features (batch, dim): the backbone's own forward, classifier removed",
    }


def read_card(path: str | Path) -> dict[str, Any] | None:
    """The card beside ``path`` (None when there is none).

    Raises:
        ValueError: a card that is not valid JSON or not an esvit card (one line naming it).
    """
    card = card_path(path)
    if not card.is_file():
        return None
    try:
        obj = json.loads(card.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{card}: not a readable JSON card ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != CARD_FORMAT or not isinstance(obj.get("backbone"), str):
        raise ValueError(f"{card}: not an esvit backbone card (field 'format' must be {CARD_FORMAT!r}, "
                         "'backbone' a name)")
    return obj


def _atomic(out: Path, write: Any) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _example(net: nn.Module, image_size: int | None) -> Tensor:
    size = int(image_size or 224)
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def _write_onnx(net: nn.Module, x: Tensor, tmp: Path) -> None:
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs onnx: pip install 'esvit[onnx]'") from None
    try:
        torch.onnx.export(net, (x,), str(tmp), input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, dynamo=False)
    except Exception as e:  # the tracer's message can span pages: keep its first line
        raise ValueError(f"this backbone cannot be exported to ONNX: {str(e).splitlines()[0]}; "
                         "export safetensors or pt instead") from None
    onnx.checker.check_model(onnx.load(str(tmp)))
    try:
        import onnxruntime as ort
    except ImportError:
        return
    got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    want = net(x).detach().numpy()
    if not abs(got - want).max() <= 1e-3 * max(1.0, float(abs(want).max())):
        raise ValueError(f"ONNX export differs from PyTorch by {abs(got - want).max():.2e}: not written")


def _write_torchscript(net: nn.Module, x: Tensor, tmp: Path) -> None:
    with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; users asked for it
        warnings.simplefilter("ignore", FutureWarning)
        try:
            traced = torch.jit.trace(net, x, check_trace=False)
        except Exception as e:
            raise ValueError(f"this backbone cannot be traced to TorchScript: {str(e).splitlines()[0]}") from None
        same = torch.allclose(traced(x), net(x), atol=1e-4)  # the traced graph, as saved
        torch.jit.save(traced, str(tmp))
    if not same:
        raise ValueError("TorchScript export differs from PyTorch: not written")


def write_backbone(net: nn.Module, out: str | Path, fmt: str, card: Mapping[str, Any],
                   image_size: int | None = None) -> Path:
    """Write ``net`` to ``out`` in ``fmt`` (atomically) and its ``card`` beside it.

    Returns:
        The written weights path.
    """
    out = Path(out)
    net = net.eval().cpu()
    state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        if fmt == "safetensors":
            from safetensors.torch import save_file

            _atomic(out, lambda tmp: save_file(state, str(tmp), metadata={"format": "esvit-backbone"}))
        elif fmt == "pt":
            _atomic(out, lambda tmp: torch.save(state, tmp))
        elif fmt == "onnx":
            _atomic(out, lambda tmp: _write_onnx(net, _example(net, image_size), tmp))
        elif fmt == "torchscript":
            _atomic(out, lambda tmp: _write_torchscript(net, _example(net, image_size), tmp))
        else:
            raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    _atomic(card_path(out), lambda tmp: tmp.write_text(json.dumps(dict(card), indent=2) + "\n"))
    return out


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file (never code).

    Raises:
        ValueError: an unreadable file (one line naming it).
    """
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
