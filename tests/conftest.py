"""Shared test settings: one intra-op thread keeps tiny-tensor tests fast and stable on 2 cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "train"


@pytest.fixture
def cifar10_train() -> Path:
    """The shared CIFAR-10 image folder; skips the test when ``../shared`` is absent."""
    if not SHARED_CIFAR.is_dir():
        pytest.skip(f"{SHARED_CIFAR} not present")
    return SHARED_CIFAR
