"""``esvit-train`` / ``python train_ssl.py``: EsViT pretraining."""

from __future__ import annotations

import argparse
import sys

NO_DATA_HELP = """\
esvit-train: no training data given.

Point it at a folder of images (class subfolders optional, nested folders fine):
    esvit-train --config configs/cifar10_resnet18.yaml data.path=/path/to/images
or try the whole pipeline on images it generates itself (CPU, under a minute):
    esvit-train --config configs/debug_cpu.yaml
Overrides: section.key=value (or --set section.key=value), e.g. optim.lr=1e-3 optim.epochs=10.
Resume:    --resume auto (latest checkpoint in logging.output_dir).
Multi-GPU: torchrun --nproc_per_node=8 train_ssl.py --config ...
"""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the training CLI."""
    from esvit.run.errors import EXIT_CODES_HELP

    p = argparse.ArgumentParser(prog="esvit-train", description="EsViT self-supervised pretraining.",
                                epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3")
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override (repeatable)")
    p.add_argument("--data", help="shortcut for data.path=... (an image folder)")
    p.add_argument("--output-dir", help="shortcut for logging.output_dir=...")
    p.add_argument("--resume", help="'auto' (latest checkpoint in the output dir) or a checkpoint path")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even if the config or the run's facts (batch split, steps per epoch, data set) "
                        "differ from the checkpoint's; the differences are logged")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (smoke tests)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    from esvit.cli.common import run_cli, setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def _run() -> int:
        from esvit.config import load_config
        from esvit.train.loop import train

        overrides = list(args.overrides) + list(args.set_)
        if args.data:
            overrides.append(f"data.path={args.data}")
        if args.output_dir:
            overrides.append(f"logging.output_dir={args.output_dir}")
        cfg = load_config(args.config, overrides)
        if cfg.data.kind == "folder" and not cfg.data.path:
            print(NO_DATA_HELP, file=sys.stderr)
            return 2
        res = train(cfg, resume=args.resume, max_steps=args.max_steps,
                    allow_config_change=args.allow_config_change)
        print(f"done: {res.step} steps, last checkpoint {res.last_checkpoint}")
        return 0

    from esvit.config import ConfigError
    from esvit.run.errors import RunError
    from esvit.train.checkpoint import CheckpointError

    # RunError: preempted, locked or unwritable output, resume mismatch, NaN, stalled loader (own exit codes)
    return run_cli(_run, (RunError, ConfigError, CheckpointError, OSError, ValueError, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
