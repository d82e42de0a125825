"""Shared fixtures: tiny Trinity configs and a deterministic CPU environment."""

from __future__ import annotations

import copy

import pytest
import torch

from trinity_titan.model import TrinityModelArgs, trinity_flavors


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def debug_args() -> TrinityModelArgs:
    """A private copy of the debug flavor (flavors are shared, mutable singletons)."""
    args = copy.deepcopy(trinity_flavors["debugmodel"])
    args.use_grouped_mm = False
    return args


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` (`pytest -m cuda` selects them) are skipped without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
