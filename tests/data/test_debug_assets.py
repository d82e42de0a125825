"""The offline debug assets load through TorchTitan and are fit for the debug training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from trinity_titan.model.flavors import trinity_flavors

ASSETS = Path(__file__).resolve().parents[2] / "trinity_titan/assets/debug"
VOCAB_SIZE = 2048
SAMPLES = [
    "Return the number of items in a container.",
    "naïve café — 東京",
    "  def f(x):\n\treturn x ** 2  \n",
    "emoji 🐍 and a NUL \x00 byte",
]


@pytest.fixture(scope="module")
def tokenizer() -> HuggingFaceTokenizer:
    return HuggingFaceTokenizer(str(ASSETS))


def read_jsonl(name: str) -> list[str]:
    with (ASSETS / name).open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [row["text"] for row in rows]


def test_vocab_size_matches_debug_flavor(tokenizer: HuggingFaceTokenizer) -> None:
    assert tokenizer.get_vocab_size() == VOCAB_SIZE
    assert trinity_flavors["debugmodel"].vocab_size >= tokenizer.get_vocab_size()


def test_bos_eos_added_once(tokenizer: HuggingFaceTokenizer) -> None:
    assert (tokenizer.bos_id, tokenizer.eos_id) == (0, 1)
    assert tokenizer.id_to_token(0) == "<|begin_of_text|>"
    assert tokenizer.id_to_token(1) == "<|end_of_text|>"
    ids = tokenizer.encode("hello world", add_bos=True, add_eos=True)
    assert ids[0] == 0 and ids[-1] == 1
    assert 0 not in ids[1:] and 1 not in ids[:-1]
    assert tokenizer.encode("hello world", add_bos=False, add_eos=False) == ids[1:-1]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer: HuggingFaceTokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=False) == (
        f"<|begin_of_text|>{text}<|end_of_text|>"
    )


def test_corpus_and_validation() -> None:
    train = read_jsonl("corpus.jsonl")
    validation = read_jsonl("validation.jsonl")
    assert len(train) > 1000 and len(validation) > 50
    assert all(isinstance(t, str) and t.strip() for t in train + validation)
    assert not set(train) & set(validation)
