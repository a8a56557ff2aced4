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
                                epilog=EXIT_CODES_HELP, formatter_class=_HelpFormatter)
    p.add_argument("--config", help="a recipe: a YAML path, or the name of a shipped one (--list-configs); "
                                    "default: the built-in defaults (a ResNet-18 photo recipe)")
    p.add_argument("--list-configs", action="store_true", help="list the shipped recipes and exit")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (recipe + overrides) as YAML and exit")
    p.add_argument("--list-backbones", action="store_true",
                   help="list the built-in backbones and exit (any timm/<name> or torchvision/<name> works too)")
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
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every option's help; the epilog kept as written."""


def _listing(args: argparse.Namespace) -> int | None:
    """``--list-configs`` / ``--list-backbones`` / ``--print-config``: print and return 0 (None: train)."""
    if args.list_configs:
        from esvit.recipes import RECIPES_DIR, list_configs

        for name in list_configs():
            first = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
            print(f"{name:32s} {first}")
        return 0
    if args.list_backbones:
        from esvit.backbones import list_backbones

        print("\n".join(n for n in list_backbones() if not n.startswith("_")))
        print("... and any timm/<name> (pip install 'esvit[timm]') or torchvision/<name> model")
        return 0
    if args.print_config:
        import yaml

        from esvit.config import config_to_dict, load_config

        print(yaml.safe_dump(config_to_dict(load_config(args.config, _overrides(args))), sort_keys=False), end="")
        return 0
    return None


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides) + list(args.set_)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.output_dir:
        overrides.append(f"logging.output_dir={args.output_dir}")
    return overrides


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    from esvit.cli.common import run_cli, setup_logging

    args = build_parser().parse_intermixed_args(argv)  # overrides anywhere among the options
    setup_logging(args.verbose)

    def _run() -> int:
        from esvit.config import load_config
        from esvit.train.loop import train

        listed = _listing(args)
        if listed is not None:
            return listed
        cfg = load_config(args.config, _overrides(args))
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
