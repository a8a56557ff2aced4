"""``esvit-viz``: pictures of what a backbone learned (PNG, matplotlib; ``pip install 'esvit[viz]'``).

Subcommands: ``correspondence``, ``attention``, ``pca`` (a backbone and images), ``embeddings``
(an ``esvit-embed`` output folder) and ``curves`` (a training run folder). See ``docs/viz.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _add_backbone(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="training checkpoint, exported backbone or (with --backbone) a state dict")
    src.add_argument("--random", action="store_true", help="randomly initialised --backbone (the baseline)")
    p.add_argument("--key", "--checkpoint-key", dest="key", default="teacher", choices=("teacher", "student"),
                   help="weights of a training checkpoint")
    p.add_argument("--backbone", help="registry name (bare state dicts and --random)")
    p.add_argument("--backbone-kw", nargs="*", default=[], metavar="KEY=VALUE",
                   help="backbone options for --random, e.g. patch_size=8 image_size=32")
    p.add_argument("--image-size", type=int,
                   help="input side (default: the checkpoint's training crop size, else 224)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto (CUDA if available), cuda, cuda:1 ...")


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``esvit-viz``."""
    p = argparse.ArgumentParser(prog="esvit-viz", description="Pictures (PNG) of what a backbone learned.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("correspondence", help="lines from every region of a view to its best match in another")
    _add_backbone(c)
    c.add_argument("--image", required=True, help="the first view")
    c.add_argument("--image2", help="the second view (default: the image flipped and recoloured)")
    c.add_argument("--no-jitter", action="store_true", help="default second view: flip only, no recolouring")
    c.add_argument("--seed", type=int, default=0, help="seed of the recolouring")
    c.add_argument("--top-k", type=int, help="draw only the K strongest matches (default: every region)")
    a = sub.add_parser("attention", help="ViT: CLS attention of the last block per head; else pooled similarity")
    _add_backbone(a)
    a.add_argument("--image", required=True)
    a.add_argument("--method", default="auto", choices=("auto", "cls_attention", "pooled_similarity"))
    q = sub.add_parser("pca", help="first three principal components of the region features as RGB")
    _add_backbone(q)
    q.add_argument("--image", required=True, nargs="+", help="one or more images (one PCA over all)")
    e = sub.add_parser("embeddings", help="2-D map of an esvit-embed output, coloured by label")
    e.add_argument("--embeddings", required=True, metavar="DIR", help="esvit-embed --out folder")
    e.add_argument("--method", default="pca", choices=("pca", "tsne", "umap"),
                   help="pca (default); tsne needs scikit-learn, umap needs umap-learn")
    e.add_argument("--max-points", type=int, default=20000, help="random subsample above this many")
    e.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("curves", help="a training run's metrics.jsonl as plots")
    r.add_argument("--run", required=True, metavar="DIR", help="run folder (logging.output_dir) or metrics.jsonl")
    r.add_argument("--metrics", nargs="*", metavar="PATTERN", help="only these series (globs, e.g. 'loss*' lr)")
    for s in (c, a, q, e, r):
        s.add_argument("--out", help="output PNG (default: <image>_<command>.png here; embeddings and "
                                     "curves: inside DIR)")
    return p


def _backbone(args: argparse.Namespace) -> tuple[Any, int | None]:
    """``(checkpoint path or (net, spec), image size)`` from the backbone options."""
    if not args.random:
        if args.backbone_kw:
            raise ValueError("--backbone-kw applies to --random only (a checkpoint records its options)")
        return args.checkpoint, args.image_size
    if not args.backbone:
        raise ValueError("--random needs --backbone NAME (see esvit.list_backbones())")
    import yaml

    from esvit.backbones import build_backbone

    kwargs = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.backbone_kw)}
    net, spec = build_backbone(args.backbone, **kwargs)
    return (net, spec), args.image_size or kwargs.get("image_size") or getattr(net, "image_size", None)


def _model_kwargs(args: argparse.Namespace, size: int | None) -> dict[str, Any]:
    return dict(image_size=size, checkpoint_key=args.key, backbone_name=None if args.random else args.backbone,
                device=args.device)


def _run(args: argparse.Namespace) -> str:
    """Make the picture; return the line to print."""
    from esvit import viz

    if args.command in ("embeddings", "curves"):
        if args.command == "curves":
            res = viz.plot_curves(args.run, args.out, args.metrics)
            return f"{len(res.series)} metrics of {res.source}: {res.png}"
        folder = Path(args.embeddings)
        m = viz.plot_embeddings(folder, args.out or folder / f"map_{args.method}.png", method=args.method,
                                max_points=args.max_points, seed=args.seed)
        return f"{len(m.points)} embeddings, {len(m.classes)} labels ({args.method}): {m.png}"
    backbone, size = _backbone(args)
    kw = _model_kwargs(args, size)
    first = args.image[0] if isinstance(args.image, list) else args.image
    out = args.out or f"{Path(first).stem}_{args.command}.png"
    if args.command == "correspondence":
        c = viz.plot_correspondence(backbone, args.image, out, args.image2, top_k=args.top_k,
                                    jitter=not args.no_jitter, seed=args.seed, **kw)
        s = c.scores
        mirrored = f", {100 * s['accuracy_all']:.0f}% on the mirrored region" if s else ""
        return f"{c.backbone} {c.grid[0]}x{c.grid[1]} regions{mirrored}: {c.png}"
    if args.command == "attention":
        a = viz.plot_attention(backbone, args.image, out, method=args.method, **kw)
        return f"{a.backbone} {a.method}, {a.maps.shape[0]} map(s): {a.png}"
    p = viz.plot_pca(backbone, args.image, out, **kw)
    return f"{p.backbone} PCA of {len(p.names)} image(s), variance {p.explained.round(3).tolist()}: {p.png}"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    from esvit.cli.common import run_cli, setup_logging
    from esvit.cli.export import known_errors
    from esvit.viz.render import MissingDependencyError, pyplot

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def run() -> int:
        pyplot()  # fail before any work when matplotlib is missing
        print(_run(args))
        return 0

    return run_cli(run, (*known_errors(), MissingDependencyError))


if __name__ == "__main__":
    sys.exit(main())
