"""A bad config fails in seconds under torchrun, with the check's one-line message."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.distributed.launch import run_train


@pytest.mark.slow
def test_torchrun_fails_in_seconds_with_the_message(tmp_path: Path):
    start = time.monotonic()
    _, log = run_train(tmp_path, 1, "--model.flavor", "tiny", check=False, timeout=120)
    assert "ConfigError: [model] flavor = 'tiny' is not a Trinity flavor" in log
    assert "Building trinity" not in log  # failed before the model was built
    assert time.monotonic() - start < 60
