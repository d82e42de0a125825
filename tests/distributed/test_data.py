"""The [data] pipeline in training: RSDB in worker processes, phases and the ramp, resumed."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from tests.distributed.launch import run_train
from tests.fixtures import DEBUG_ASSETS, DEBUG_TOML, write_corpora


@pytest.mark.slow
def test_train_through_pipeline_resumes_bitwise(tmp_path):
    """1 rank, 2 workers, RSDB over jsonl + parquet, two phases, batch ramp; resume at step 3."""
    _, parquet, _ = write_corpora(tmp_path)
    corpus = DEBUG_ASSETS / "corpus.jsonl"
    config = tmp_path / "pipeline.toml"
    config.write_text(
        DEBUG_TOML.read_text()
        + f"""
[data]
mixing = "rsdb"
rsdb_buffer_docs = 4  # 2 per worker: refills often, so phase 2 documents arrive
seed = 7
table_block_rows = 8  # the 30-row parquet file: 4 blocks for the 2 readers
jsonl_block_bytes = 65536

[[data.sources]]
path = "{corpus}"

[[data.sources]]
path = "{parquet}"
text_field = "content"

[[data.phases]]
tokens = 1024
weights = [1.0, 0.0]

[[data.phases]]
tokens = 1_000_000
weights = [0.5, 0.5]

[[data.batch_ramp]]
tokens = 512
global_batch_size = 4
"""
    )
    args = (
        "--training.steps", "6",
        "--training.local_batch_size", "2",
        "--training.dataloader.num_workers", "2",
        "--checkpoint.enable",
        "--checkpoint.interval", "3",
    )  # fmt: skip
    run = dict(config=config, module="trinity_titan.train", timeout=300)
    full, log = run_train(tmp_path / "full", 1, *args, **run)
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    # 2 steps of 2 x 128 tokens reach the 512-token threshold: step 3 accumulates 2 micro-batches.
    assert "Batch ramp at 512 tokens (step 3): global batch 4 sequences" in log
    assert "Data phase 2/2 from" in log

    step3 = tmp_path / "resumed" / "checkpoint" / "step-3"
    shutil.copytree(tmp_path / "full" / "checkpoint" / "step-3", step3)
    resumed, log = run_train(tmp_path / "resumed", 1, *args, **run)
    assert "Training starts at step 4" in log
    assert "Batch ramp at 1024 tokens (step 4): global batch 4 sequences" in log  # restored
    assert "DataLoader state is empty" not in log
    assert sorted(resumed) == [4, 5, 6]
    assert all(resumed[s] == full[s] for s in resumed), (full, resumed)


@pytest.mark.slow
def test_bad_documents_are_skipped_and_counted(tmp_path):
    """on_bad_document = "skip": the scan announces the bad documents, the readers (in worker
    processes, on 2 ranks) skip them, and data/skipped_documents counts them over the ranks."""
    corpus = tmp_path / "web.jsonl"
    lines = [json.dumps({"text": f"document {i} " * 30}) for i in range(40)]
    bad = {3: {"body": "elsewhere"}, 4: {"text": "   "}, 17: {"text": None}, 30: {"text": 7}}
    for i, doc in bad.items():
        lines[i] = json.dumps(doc)
    corpus.write_text("\n".join(lines) + "\n")
    config = tmp_path / "skip.toml"
    config.write_text(
        DEBUG_TOML.read_text()
        + '\n[data]\nmixing = "sequential"\non_bad_document = "skip"\njsonl_block_bytes = 4096\n\n'
        + f'[[data.sources]]\npath = "{corpus}"\n'
    )
    args = ("--training.steps", "4", "--training.local_batch_size", "2",
            "--training.dataloader.num_workers", "1")  # fmt: skip
    _, log = run_train(tmp_path / "run", 2, *args, config=config, module="trinity_titan.train",
                       timeout=300)  # fmt: skip
    assert (
        f"data file {corpus} ([[data.sources]] entry 0): 4 of 40 documents have no usable text "
        "and will be skipped (on_bad_document = 'skip'): line 4 has no field 'text'; line 5 has "
        "a blank field 'text'; line 18 has no field 'text'"
    ) in log
    skipped = re.findall(r"Skipped data source .* it (has .*?) \((\d+) so far\)", log)
    assert {problem for problem, _ in skipped} >= {
        "has no field 'text'",
        "has a blank field 'text'",
    }
    counts = [int(c) for c in re.findall(r"data/skipped_documents: (\d+)", log)]
    assert counts and counts == sorted(counts) and 0 < counts[-1] <= len(skipped)
