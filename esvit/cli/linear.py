"""``esvit-linear`` / ``python linear_eval.py``: linear probe of a frozen backbone."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esvit.cli.common import add_preprocess_arg
from esvit.cli.export import add_backbone_args, backbone_kwargs, known_errors
from esvit.cli.knn import add_cache_args, add_split_args, cache_dir


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``esvit-linear``."""
    p = argparse.ArgumentParser(
        prog="esvit-linear",
        description="Linear evaluation: frozen backbone, cached features, L-BFGS or SGD classifier.",
    )
    add_backbone_args(p)
    add_preprocess_arg(p)
    add_split_args(p)
    p.add_argument("--mode", default="none", choices=("none", "flip", "augment"),
                   help="none/flip: cached features (flip caches flipped images too); augment: "
                        "DINO protocol, RandomResizedCrop+flip each epoch (slow)")
    p.add_argument("--solver", choices=("lbfgs", "sgd"),
                   help="default: lbfgs for cached features, sgd for --mode augment")
    p.add_argument("--norm", choices=("standardize", "bn", "none"),
                   help="input normalisation of the classifier (default: standardize; bn for augment)")
    p.add_argument("--epochs", type=int, default=100, help="SGD epochs")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate per 256 samples")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--l2", type=float, default=1e-4, help="L-BFGS L2 penalty")
    p.add_argument("--max-iter", type=int, default=500, help="L-BFGS iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir",
                   help="results and classifier (default: <checkpoint dir>/linear_eval)")
    add_cache_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    from esvit.cli.common import describe_preprocess, run_cli, setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def _run() -> int:
        from esvit.eval.linear import describe_linear, linear_probe

        out_dir = args.output_dir or str(Path(args.checkpoint).parent / "linear_eval")
        res = linear_probe(
            args.checkpoint, args.train, args.val, val_split=args.val_split, output_dir=out_dir,
            mode=args.mode, solver=args.solver, norm=args.norm, epochs=args.epochs, lr=args.lr,
            batch_size=args.batch_size, l2=args.l2, max_iter=args.max_iter, seed=args.seed,
            cache=not args.no_cache, cache_dir=cache_dir(args), preprocess=args.preprocess,
            **backbone_kwargs(args),
        )
        for line in describe_linear(res):
            print(line)
        print(f"preprocessing: {describe_preprocess(res['preprocess'])}")
        print(f"results: {Path(out_dir) / 'linear_results.json'}")
        return 0

    return run_cli(_run, (*known_errors(), TimeoutError))  # TimeoutError: stalled decoding


if __name__ == "__main__":
    sys.exit(main())
