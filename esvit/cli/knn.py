"""``esvit-knn``: weighted kNN evaluation of a frozen backbone on labeled image folders."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esvit.cli.common import add_preprocess_arg
from esvit.cli.export import add_backbone_args, backbone_kwargs, known_errors


def add_cache_args(p: argparse.ArgumentParser) -> None:
    """``--cache-dir`` and ``--no-cache`` (the feature cache shared by esvit-knn and esvit-linear)."""
    p.add_argument("--cache-dir",
                   help="feature cache, shared by esvit-knn and esvit-linear: features of the same "
                        "checkpoint, images and protocol are computed once (default: "
                        "<checkpoint dir>/eval_features, or <output-dir>/features with --output-dir)")
    p.add_argument("--no-cache", action="store_true", help="do not cache features")


def cache_dir(args: argparse.Namespace) -> str | None:
    """The ``cache_dir`` argument of the evaluation API for parsed CLI ``args``."""
    if args.cache_dir or args.output_dir:
        return args.cache_dir
    return str(Path(args.checkpoint).parent / "eval_features")


def add_split_args(p: argparse.ArgumentParser) -> None:
    """``--train/--data``, ``--val`` and ``--val-split``."""
    p.add_argument("--train", "--data", dest="train", required=True,
                   help="training image folder (one subfolder per class)")
    p.add_argument("--val", help="validation image folder (same class names)")
    p.add_argument("--val-split", type=int,
                   help="instead of --val: hold out the last N images of every class of --train")


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``esvit-knn``."""
    p = argparse.ArgumentParser(prog="esvit-knn",
                                description="Weighted kNN (DINO protocol) on frozen features.")
    add_backbone_args(p)
    add_preprocess_arg(p)
    add_split_args(p)
    p.add_argument("--ks", type=int, nargs="+",
                   help="neighbour counts, each at most the bank size (default: 10 20 100 200, "
                        "those larger than the bank dropped)")
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--batch-size", type=int, default=256, help="feature extraction batch size")
    p.add_argument("--output-dir", help="knn_results.json (default: <checkpoint dir>/knn_eval)")
    add_cache_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    from esvit.cli.common import describe_preprocess, run_cli, setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def _run() -> int:
        from esvit.eval.knn import describe_knn, knn_eval

        out_dir = args.output_dir or str(Path(args.checkpoint).parent / "knn_eval")
        res = knn_eval(args.checkpoint, args.train, args.val, val_split=args.val_split,
                       ks=tuple(args.ks) if args.ks else None, temperature=args.temperature,
                       batch_size=args.batch_size, output_dir=out_dir,
                       cache=not args.no_cache, cache_dir=cache_dir(args),
                       preprocess=args.preprocess, **backbone_kwargs(args))
        for line in describe_knn(res):
            print(line)
        print(f"preprocessing: {describe_preprocess(res['preprocess'])}")
        print(f"results: {Path(out_dir) / 'knn_results.json'}")
        return 0

    return run_cli(_run, (*known_errors(), TimeoutError))  # TimeoutError: stalled decoding


if __name__ == "__main__":
    sys.exit(main())
