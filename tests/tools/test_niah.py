"""MK-NIAH: haystack construction, scoring, and an end-to-end run on the debug model (CPU)."""

from __future__ import annotations

import copy
import random
import re
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from trinity_titan.model import TrinityModel, trinity_flavors
from trinity_titan.tools import niah

TOKENIZER = Path(__file__).resolve().parents[2] / "trinity_titan" / "assets" / "debug"


@pytest.fixture(scope="module")
def tokenizer():
    return HuggingFaceTokenizer(str(TOKENIZER))


def _needle_value(text: str, key: str) -> str:
    found = re.findall(rf"magic numbers for {re.escape(key)} is: (\d+)\.", text)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("length", [256, 1024])
def test_sample_holds_every_needle_once(tokenizer, length):
    rng = random.Random(0)
    for _ in range(5):
        s = niah.make_sample(tokenizer, length, num_keys=4, rng=rng)
        text = tokenizer.decode(s.prompt_ids)
        assert len(re.findall(r"special magic numbers for", text)) == 4
        assert _needle_value(text, s.key) == s.value
        assert text.rstrip().endswith(f"for {s.key} mentioned in the provided text is")
        assert length - 42 <= len(s.prompt_ids) <= length, len(
            s.prompt_ids
        )  # 42: one filler sentence


def test_scoring_with_an_oracle_and_a_wrong_answer(tokenizer, monkeypatch):
    model = torch.nn.Identity()  # never called: answers are injected

    def oracle(_model, prompt_ids, _budget, _device):
        text = tokenizer.decode(prompt_ids)
        key = re.findall(r"special magic number for (\S+) mentioned", text)[-1]
        return tokenizer.encode(" " + _needle_value(text, key), add_bos=False, add_eos=False)

    monkeypatch.setattr(niah, "greedy_answer", oracle)
    perfect = niah.evaluate(model, tokenizer, [256, 400], num_samples=4, num_keys=3)
    assert perfect == {256: 1.0, 400: 1.0}
    monkeypatch.setattr(niah, "greedy_answer", lambda *a: tokenizer.encode(" 0000000"))
    assert niah.evaluate(model, tokenizer, [256], num_samples=4, num_keys=3) == {256: 0.0}


def test_too_short_a_context_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="too short for 4 needles"):
        niah.make_sample(tokenizer, 100, num_keys=4, rng=random.Random(0))


def test_end_to_end_on_the_debug_model(tmp_path, capsys):
    args = copy.deepcopy(trinity_flavors["debugmodel"])
    model = TrinityModel(args)
    model.init_weights(buffer_device=torch.device("cpu"))
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "step-0"))
    results = niah.run(
        [
            "--checkpoint",
            str(tmp_path / "step-0"),
            "--flavor",
            "debugmodel",
            "--tokenizer",
            str(TOKENIZER),
            "--lengths",
            "160,240",
            "--num-samples",
            "2",
            "--num-keys",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert set(results) == {160, 240} and all(0.0 <= a <= 1.0 for a in results.values())
    out = capsys.readouterr().out
    assert "MK-NIAH" in out and "240" in out


def test_dcp_checkpoint_needs_a_shape(tmp_path):
    with pytest.raises(ValueError, match="--flavor or --hf-config"):
        niah.load_model(tmp_path, None, 128, torch.device("cpu"))
