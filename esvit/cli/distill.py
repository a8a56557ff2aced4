"""``esvit-distill`` / ``python distill.py``: knowledge distillation into a student classifier."""

from __future__ import annotations

import argparse
import sys

NO_DATA_HELP = """\
esvit-distill: no training data given.

Point it at a labeled image folder (one subfolder per class) and a teacher, e.g.
    esvit-distill --config configs/distill_cifar10.yaml --data /path/to/train --val-split 500 \\
        teacher.checkpoint=runs/cifar10_resnet18/checkpoint_00039000.pt
or try the whole pipeline on generated images (CPU, seconds):
    esvit-distill --config configs/distill_debug_cpu.yaml
Overrides: section.key=value (or --set section.key=value), e.g. loss.kind=dkd optim.epochs=50.
Resume:    --resume auto (latest checkpoint in logging.output_dir).
"""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the distillation CLI."""
    from esvit.run.errors import EXIT_CODES_HELP

    p = argparse.ArgumentParser(prog="esvit-distill",
                                description="Distil a frozen teacher into a student classifier (KD, DKD, DIST, DeiT).",
                                epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/distill_*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.kind=dkd")
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override (repeatable)")
    p.add_argument("--data", "--train", dest="data", help="shortcut for data.path=... (labeled image folder)")
    p.add_argument("--val", help="shortcut for data.val_path=... (validation folder, same class names)")
    p.add_argument("--val-split", type=int, help="shortcut for data.val_split=N (last N images per class held out)")
    p.add_argument("--teacher", help="shortcut for teacher.checkpoint=...")
    p.add_argument("--output-dir", help="shortcut for logging.output_dir=...")
    p.add_argument("--resume", help="'auto' (latest checkpoint in the output dir) or a checkpoint path")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even if the config or the run's facts (batch split, steps per epoch, data set) "
                        "differ from the checkpoint's; the differences are logged")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (smoke tests)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _print_results(res: dict) -> None:
    for name, key in (("student", "val"), ("teacher", "teacher_val")):
        acc = res.get(key)
        if not acc:
            continue
        top5 = f"  top-5 {acc['top5']:6.2f}%" if "top5" in acc else ""
        print(f"{name:>8} val  top-1 {acc['top1']:6.2f}%{top5}  ({acc['n']} images)")
        for head, h in (acc.get("heads") or {}).items():
            print(f"{'':>8} {head:>4} head top-1 {h['top1']:6.2f}%")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    from esvit.cli.common import run_cli, setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def _run() -> int:
        from pathlib import Path

        from esvit.config import ConfigError, load_yaml_config
        from esvit.distill.config import DistillConfig, validate_distill
        from esvit.distill.train import RESULTS_FILE, distill

        overrides = list(args.overrides) + list(args.set_)
        for flag, key in ((args.data, "data.path"), (args.val, "data.val_path"), (args.val_split, "data.val_split"),
                          (args.teacher, "teacher.checkpoint"), (args.output_dir, "logging.output_dir")):
            if flag is not None:
                overrides.append(f"{key}={flag}")
        cfg = load_yaml_config(DistillConfig, args.config, overrides)  # keys and types checked
        if cfg.data.kind == "folder" and not cfg.data.path:
            print(NO_DATA_HELP, file=sys.stderr)
            return 2
        try:
            validate_distill(cfg)
        except ConfigError as e:
            raise ConfigError(f"{args.config}: {e}" if args.config else str(e)) from None
        res = distill(cfg, resume=args.resume, max_steps=args.max_steps,
                      allow_config_change=args.allow_config_change)
        print(f"done: {res.step} steps, last checkpoint {res.last_checkpoint}")
        if res.results:
            _print_results(res.results)
            print(f"results: {Path(cfg.logging.output_dir) / RESULTS_FILE}")
        return 0

    from esvit.config import ConfigError
    from esvit.run.errors import RunError
    from esvit.train.checkpoint import CheckpointError

    # RunError: preempted, locked or unwritable output, resume mismatch, NaN, stalled loader (own exit codes)
    return run_cli(_run, (RunError, ConfigError, CheckpointError, OSError, ValueError, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
