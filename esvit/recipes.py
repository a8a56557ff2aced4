"""The shipped recipes (``esvit/configs/*.yaml``, installed with the package): find them by name.

``--config NAME`` accepts a path (``configs/debug_cpu.yaml``, ``/abs/run.yaml``) or the name of
a shipped recipe (``debug_cpu`` or ``debug_cpu.yaml``); a path that exists wins.
"""

from __future__ import annotations

import difflib
from pathlib import Path

__all__ = ["RECIPES_DIR", "find_config", "list_configs"]

#: Folder of the shipped recipes (inside the installed package).
RECIPES_DIR = Path(__file__).resolve().parent / "configs"


def list_configs() -> list[str]:
    """Names (without ``.yaml``) of the shipped recipes, sorted."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def find_config(name_or_path: str | Path) -> Path:
    """Resolve ``--config``: an existing path, else a shipped recipe's name.

    Raises:
        FileNotFoundError: neither a file nor a shipped recipe (one line, with the closest names).
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    shipped = RECIPES_DIR / f"{stem}.yaml"
    if shipped.is_file() and (len(path.parts) == 1 or path.parent.name == "configs"):
        return shipped
    close = difflib.get_close_matches(stem, list_configs(), n=3, cutoff=0.5)
    raise FileNotFoundError(
        f"config not found: {name_or_path} (not a file, nor a shipped recipe"
        + (f"; closest: {', '.join(close)}" if close else "") + "; see --list-configs)"
    )
