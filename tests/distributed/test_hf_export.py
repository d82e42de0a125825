"""Hugging Face checkpoints in and out of torchrun training on CPU (gloo).

- A run starts from HF weights (TorchTitan's initial_load_in_hf) exactly where the DCP seed does.
- `--checkpoint.last_save_in_hf` under Trinity's trainer leaves a folder that transformers loads as
  it is, and greedy decoding from it gives the trained Trinity model's tokens.
- `[model] hf_config` trains a shape no flavor has, under both launchers.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.distributed.launch import from_seed, make_seed_checkpoint, run_train
from tests.fixtures import DEBUG_ASSETS, NANO_HF_CONFIG
from trinity_titan.model import TrinityModel, TrinityModelArgs
from trinity_titan.tools.convert import main as convert
from trinity_titan.tools.convert import read_hf

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")


def test_training_starts_from_an_hf_checkpoint(tmp_path):
    """TorchTitan's own HF-loading path (initial_load_in_hf) starts exactly where the DCP seed does."""
    seed = make_seed_checkpoint(tmp_path / "seed")
    convert(["dcp-to-hf", str(seed), str(tmp_path / "hf"), "--flavor", "debugmodel",
             "--tokenizer", str(DEBUG_ASSETS), "--max-shard-size-gb", "0.001"])  # fmt: skip
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    train = ("--training.steps", "3", "--parallelism.data_parallel_shard_degree", "2")
    from_dcp, _ = run_train(tmp_path / "a", 2, *train, *from_seed(seed))
    from_hf, log = run_train(
        tmp_path / "b", 2, *train, "--checkpoint.enable",
        "--checkpoint.initial_load_path", str(tmp_path / "hf"), "--checkpoint.initial_load_in_hf",
    )  # fmt: skip
    assert "loading from HF safetensors" in log
    assert from_hf == pytest.approx(from_dcp, rel=1e-6, abs=1e-6) and len(from_hf) == 3


def test_last_save_in_hf_is_a_self_contained_folder(tmp_path):
    _, log = run_train(
        tmp_path, 2, "--training.steps", "3", "--parallelism.data_parallel_shard_degree", "2",
        "--checkpoint.enable", "--checkpoint.last_save_in_hf", module="trinity_titan.train",
    )  # fmt: skip
    folder = tmp_path / "checkpoint" / "step-3"
    assert f"HF export {folder}: wrote config.json, generation_config.json, tokenizer.json" in log
    config = json.loads((folder / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["dtype"]) == (0, 1, "float32")
    assert config["max_position_embeddings"] == 4096  # the debug flavor's context

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    args, state = read_hf(folder)  # the same weights, into Trinity's model
    args.use_grouped_mm = False
    ours = TrinityModel(args)
    ours.load_state_dict(state)
    ours.eval()
    ids = [0, *tokenizer("alpha beta gamma delta").input_ids]
    with torch.no_grad():
        generated = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0]
        tokens = torch.tensor([ids])
        for _ in range(12):
            tokens = torch.cat([tokens, ours(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert generated.tolist() == tokens[0].tolist()


def _odd_shape(tmp_path) -> tuple[str, TrinityModelArgs]:
    """An HF config.json of a shape no flavor has: 3 layers, 6 experts top-3, width 96."""
    hf = dict(
        NANO_HF_CONFIG,
        vocab_size=2048,
        hidden_size=96,
        num_hidden_layers=3,
        num_dense_layers=1,
        intermediate_size=160,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=32,
        num_experts=6,
        num_experts_per_tok=3,
        moe_intermediate_size=48,
        sliding_window=16,
        max_position_embeddings=1024,
    )
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    return str(path), TrinityModelArgs.from_hf_config(hf)


@pytest.mark.parametrize("module", ["trinity_titan.train", "torchtitan.train"])
def test_a_shape_from_an_hf_config_trains_under_both_launchers(tmp_path, module):
    path, args = _odd_shape(tmp_path)
    with torch.device("meta"):
        expected = sum(p.numel() for p in TrinityModel(args).parameters())
    losses, log = run_train(
        tmp_path / "run", 1, "--model.hf_config", path, "--training.steps", "3", module=module
    )
    total = int(re.search(r"Trinity parameters: total ([\d,]+)", log).group(1).replace(",", ""))
    assert total == expected
    assert sorted(losses) == [1, 2, 3]
