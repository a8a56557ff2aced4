"""The recipes ship with the package and are found by name; the wheel carries them."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from esvit.recipes import RECIPES_DIR, find_config, list_configs

ROOT = Path(__file__).resolve().parents[1]


def test_every_recipe_is_shipped_and_found_by_name() -> None:
    names = list_configs()
    assert {"debug_cpu", "cifar10_vit_nano", "esvit_swin_tiny_imagenet"} <= set(names)
    for name in names:
        assert find_config(name) == find_config(f"{name}.yaml") == RECIPES_DIR / f"{name}.yaml"
    assert (ROOT / "configs").resolve() == RECIPES_DIR  # the checkout's configs/ is the shipped folder


def test_paths_still_work_and_win(tmp_path: Path) -> None:
    own = tmp_path / "debug_cpu.yaml"
    own.write_text("seed: 3\n")
    assert find_config(own) == own
    assert find_config("configs/debug_cpu.yaml").resolve() == RECIPES_DIR / "debug_cpu.yaml"


def test_unknown_config_is_one_line_with_the_closest() -> None:
    with pytest.raises(FileNotFoundError, match="closest: debug_cpu") as e:
        find_config("debug_cpuu")
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_wheel_carries_recipes_and_py_typed(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True)
    wheel = next(tmp_path.glob("esvit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "esvit/py.typed" in names
    assert {f"esvit/configs/{n}.yaml" for n in list_configs()} <= names


def test_defaults_are_a_coherent_photo_recipe() -> None:
    """No --config: 224/96 crops on a backbone made for them (not a CIFAR stem at 224 px)."""
    from esvit.config import load_config

    cfg = load_config(None)
    assert cfg.model.backbone == "resnet18" and (cfg.augment.global_size, cfg.augment.local_size) == (224, 96)
    assert cfg.data.resize_mode == "letterbox" and cfg.data.canvas_size >= 448
