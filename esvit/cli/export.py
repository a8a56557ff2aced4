"""``esvit-export``: write a checkpoint's backbone as a standalone torchvision-loadable file.

Also holds the argument helpers shared by the evaluation CLIs (``esvit-linear``, ``esvit-knn``,
``esvit-embed``).
"""

from __future__ import annotations

import argparse
import sys


def add_backbone_args(p: argparse.ArgumentParser, features: bool = True) -> None:
    """Add ``--checkpoint/--key/--backbone`` (and with ``features`` the feature options)."""
    p.add_argument("--checkpoint", required=True,
                   help="training checkpoint, exported backbone or (with --backbone) a state dict")
    p.add_argument("--key", "--checkpoint-key", dest="key", default="teacher",
                   choices=("teacher", "student"), help="weights of a training checkpoint")
    p.add_argument("--backbone", help="registry name (needed for bare state dicts only)")
    if not features:
        return
    p.add_argument("--image-size", type=int,
                   help="evaluation resolution (default: training global crop size, else 224)")
    p.add_argument("--canvas-size", type=int, help="image decode size (default: --image-size)")
    p.add_argument("--feature", default="pooled", choices=("pooled", "last_n"),
                   help="pooled last layer, or concat of the last n blocks / stages")
    p.add_argument("--n-last", type=int,
                   help="last_n: blocks (ViT, default 4) or stages (CNN/Swin, default 2)")
    p.add_argument("--avgpool", action="store_true",
                   help="last_n ViT: append the average of the patch tokens")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--num-workers", type=int, default=4, help="image decoding workers")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("-v", "--verbose", action="store_true")


def backbone_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of the evaluation APIs taken from :func:`add_backbone_args` options."""
    return dict(checkpoint_key=args.key, backbone_name=args.backbone, image_size=args.image_size,
                canvas_size=args.canvas_size, feature=args.feature, n_last=args.n_last,
                avgpool=args.avgpool, device=args.device, num_workers=args.num_workers,
                progress=not args.no_progress)


def known_errors() -> tuple[type[BaseException], ...]:
    """User errors reported as one ``error: ...`` line with exit code 2."""
    from esvit.train.checkpoint import CheckpointError

    return (CheckpointError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, ImportError,
            TimeoutError)


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``esvit-export``."""
    p = argparse.ArgumentParser(
        prog="esvit-export",
        description="Export the teacher (or student) backbone of a checkpoint as safetensors, a plain "
                    "state dict (loads with strict=True into the matching torchvision / timm model), "
                    "ONNX or TorchScript, with a JSON card beside it.",
    )
    add_backbone_args(p, features=False)
    p.add_argument("--out", required=True,
                   help="output file: .safetensors, .pt (plain state dict), .onnx or .ts (TorchScript); "
                        "a JSON card with the constructor, input size and normalisation is written beside it")
    p.add_argument("--format", choices=("safetensors", "pt", "onnx", "torchscript"),
                   help="export format (default: from the --out extension; a mismatch is an error)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    from esvit.cli.common import run_cli, setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def _run() -> int:
        from esvit.export import export_backbone

        out = export_backbone(args.checkpoint, args.out, checkpoint_key=args.key,
                              backbone=args.backbone, fmt=args.format)
        print(f"exported {args.key} backbone to {out}")
        return 0

    return run_cli(_run, known_errors())


if __name__ == "__main__":
    sys.exit(main())
