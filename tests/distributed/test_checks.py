"""A bad config or corpus fails in seconds under torchrun, before the model is built, with the
check's one-line message: no traceback, exit status 2."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.distributed.launch import assert_clean_failure, run_train
from tests.fixtures import DEBUG_TOML

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("module", "nproc"), [("trinity_titan.train", 2), ("torchtitan.train", 1)])
def test_a_misspelt_flavor_lists_the_flavors(tmp_path: Path, module: str, nproc: int):
    start = time.monotonic()
    _, log = run_train(tmp_path, nproc, "--model.flavor", "tiny", module=module, check=False,
                       timeout=300)  # fmt: skip
    assert_clean_failure(
        log,
        "[model] flavor = 'tiny' is not a Trinity flavor. Fix: set --model.flavor to one of "
        "debugmodel, large, mini, nano.",
    )
    assert "Building trinity" not in log  # failed before the model was built
    assert time.monotonic() - start < 120


def test_a_bad_document_is_named_before_training(tmp_path: Path):
    corpus = tmp_path / "web.jsonl"
    lines = [json.dumps({"text": f"document {i} " * 20}) for i in range(30)]
    lines[6] = json.dumps({"body": "the text is under another key"})
    corpus.write_text("\n".join(lines) + "\n")
    config = tmp_path / "data.toml"
    config.write_text(DEBUG_TOML.read_text() + f'\n[[data.sources]]\npath = "{corpus}"\n')
    _, log = run_train(tmp_path / "run", 2, config=config, check=False, timeout=300)
    assert_clean_failure(
        log,
        f"data file {corpus} ([[data.sources]] entry 0): 1 of 30 documents have no usable text: "
        "line 7 has no field 'text'.",
    )
    assert 'on_bad_document = "skip"' in log and "step:" not in log
