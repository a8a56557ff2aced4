"""Shared CLI helpers: logging set-up and one-line error reporting."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr; only rank 0 logs at INFO under torchrun."""
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)


def run_cli(main: Callable[[], int | None], known_errors: tuple[type[BaseException], ...]) -> int:
    """Run ``main``; print known user errors as one line (``error: ...``) and return 2."""
    try:
        return main() or 0
    except known_errors as e:
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # always one line
        print(f"error: {msg}", file=sys.stderr)
        return 2
