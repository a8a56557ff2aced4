"""Shared CLI helpers: logging set-up, one-line error reporting, evaluation preprocessing."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr; only rank 0 logs at INFO under torchrun."""
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    handlers = [_TqdmHandler()] if sys.stderr.isatty() else None  # lines above the bar, not through it
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True, handlers=handlers)


class _TqdmHandler(logging.StreamHandler):
    """Log records written with ``tqdm.write`` so that a progress bar is redrawn below them."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # never let logging kill a run
            self.handleError(record)


def run_cli(main: Callable[[], int | None], known_errors: tuple[type[BaseException], ...]) -> int:
    """Run ``main``; print a known error as one line and return its exit code.

    The line is ``<label>: <message>`` (label ``error``, or ``stopped`` for a preemption); the
    exit code is the error's ``exit_code`` (see :mod:`esvit.run.errors`: 74 unwritable output,
    75 output directory locked, 124 stalled loader, 128 + signal after a graceful stop), else 2.
    A Ctrl-C outside a run's own handling is ``interrupted`` and exit code 130.
    """
    try:
        return main() or 0
    except known_errors as e:
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # always one line
        code = getattr(e, "exit_code", 2)
        print(f"{getattr(e, 'label', 'error')}: {msg}", file=sys.stderr)
        return code if isinstance(code, int) and not isinstance(code, bool) else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def add_preprocess_arg(p: argparse.ArgumentParser) -> None:
    """Add ``--preprocess {auto,dino,resize}`` (the evaluation preprocessing protocol)."""
    p.add_argument(
        "--preprocess", default="auto", choices=("auto", "dino", "resize"),
        help="dino: short side to image-size/0.875 (256 for 224, bicubic), centre crop "
             "image-size (DINO/EsViT eval); resize: short side to --canvas-size, centre square, "
             "resized to image-size; auto (default): dino when the images are larger than "
             "image-size (resize when --canvas-size is given)")


def describe_preprocess(record: dict) -> str:
    """One line naming the protocol of a results ``"preprocess"`` record."""
    from esvit.eval.features import EvalPreprocess

    return EvalPreprocess.from_record(record).describe()
