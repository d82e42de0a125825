"""HF <-> DCP conversion: exact round trip through sharded safetensors, and HF reloads the output."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from tests.fixtures import DEBUG_ASSETS
from trinity_titan.model import TrinityModel, TrinityModelArgs, trinity_flavors
from trinity_titan.tools.convert import INDEX_FILE, main, read_dcp_model, read_hf

transformers = pytest.importorskip("transformers")

CONFIG = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    moe_intermediate_size=8,
    num_hidden_layers=4,
    num_dense_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    num_experts=4,
    num_experts_per_tok=2,
    num_shared_experts=1,
    route_scale=2.0,
    sliding_window=4,
    mup_enabled=True,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def _hf_dir(tmp_path):
    torch.manual_seed(0)
    hf = transformers.AfmoeForCausalLM(transformers.AfmoeConfig(**CONFIG)).eval()
    with torch.no_grad():
        for _, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # several shards + index
    return hf, tmp_path / "hf"


def _all_tensors(hf_dir):
    index = json.loads((hf_dir / INDEX_FILE).read_text())
    out = {}
    for name in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(hf_dir / name)))
    assert set(out) == set(index["weight_map"])
    return out


def test_round_trip_is_exact_and_sharded(tmp_path):
    hf, src = _hf_dir(tmp_path)
    assert len(set(json.loads((src / INDEX_FILE).read_text())["weight_map"].values())) > 1
    main(["hf-to-dcp", str(src), str(tmp_path / "dcp")])
    main(
        [
            "dcp-to-hf",
            str(tmp_path / "dcp"),
            str(tmp_path / "back"),
            "--hf-config",
            str(src / "config.json"),
            "--no-tokenizer",
            "--max-shard-size-gb",
            str(30e3 / 2**30),
        ]
    )
    original, back = _all_tensors(src), _all_tensors(tmp_path / "back")
    assert set(back) == set(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key
    assert len(list((tmp_path / "back").glob("*.safetensors"))) > 1

    # transformers loads what we wrote, and computes the same logits as the source model.
    reloaded = transformers.AfmoeForCausalLM.from_pretrained(tmp_path / "back").eval()
    tokens = torch.randint(0, CONFIG["vocab_size"], (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, hf(tokens).logits, rtol=0, atol=0)


def test_dcp_holds_trinity_weights(tmp_path):
    hf, src = _hf_dir(tmp_path)
    main(["hf-to-dcp", str(src), str(tmp_path / "dcp")])
    args = TrinityModelArgs.from_hf_config(json.loads((src / "config.json").read_text()))
    state = read_dcp_model(tmp_path / "dcp", args)
    model = TrinityModel(args)
    model.load_state_dict(state)
    tokens = torch.randint(0, CONFIG["vocab_size"], (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)
    _, direct = read_hf(src)
    assert all(torch.equal(direct[k], state[k]) for k in direct)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        main(["hf-to-dcp", str(tmp_path), str(tmp_path / "out")])
    to_hf = ["dcp-to-hf", str(tmp_path), str(tmp_path / "out"), "--no-tokenizer"]
    with pytest.raises(FileNotFoundError, match="not a DCP checkpoint"):
        main([*to_hf, "--flavor", "debugmodel"])
    with pytest.raises(SystemExit, match="unknown --flavor"):
        main([*to_hf, "--flavor", "tiny"])


def _random_debug_checkpoint(folder: Path) -> TrinityModel:
    """The debug model with large random weights (distinct greedy tokens), saved as TorchTitan's
    model-only DCP checkpoint."""
    args = copy.deepcopy(trinity_flavors["debugmodel"])
    args.use_grouped_mm = False
    torch.manual_seed(3)
    model = TrinityModel(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p)
            )
        for layer in model.layers.values():
            if layer.moe_enabled:
                layer.moe.expert_bias.copy_(0.05 * torch.randn_like(layer.moe.expert_bias))
    dcp.save(model.state_dict(), checkpoint_id=str(folder))
    return model.eval()


def _greedy(model: TrinityModel, ids: list[int], new: int) -> list[int]:
    tokens = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(new):
            nxt = model(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
    return tokens[0].tolist()


def test_an_export_is_self_contained_and_generates_like_trinity(tmp_path):
    """dcp-to-hf with the run's tokenizer: transformers' Auto classes load the folder alone, and
    greedy decoding past the sliding window gives Trinity's tokens."""
    ours = _random_debug_checkpoint(tmp_path / "dcp")
    out = tmp_path / "hf"
    assert main(["dcp-to-hf", str(tmp_path / "dcp"), str(out), "--flavor", "debugmodel",
                 "--tokenizer", str(DEBUG_ASSETS), "--dtype", "float32"]) == 0  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    project_tokenizer = HuggingFaceTokenizer(str(DEBUG_ASSETS))
    assert (config["bos_token_id"], config["eos_token_id"]) == (
        project_tokenizer.bos_id,
        project_tokenizer.eos_id,
    )
    assert config["pad_token_id"] is None  # the debug tokenizer has no pad token
    assert config["max_position_embeddings"] == trinity_flavors["debugmodel"].context_len
    assert config["dtype"] == "float32"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 0, "eos_token_id": 1}

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.dtype == torch.float32
    prompt = "the quick brown fox jumps over the lazy dog"
    ids = project_tokenizer.encode(prompt, add_bos=True, add_eos=False)
    assert tokenizer(prompt).input_ids == ids[1:]  # the debug tokenizer.json adds no BOS itself
    new = 40  # prompt + new tokens > the sliding window (32): local layers drop old keys
    assert len(ids) + new > trinity_flavors["debugmodel"].sliding_window
    with torch.no_grad():
        generated = hf.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False)[0]
    expected = _greedy(ours, ids, new)
    assert generated.tolist() == expected
    assert len(set(expected[len(ids) :])) > 5, expected  # not a degenerate repetition
    assert tokenizer.decode(generated[len(ids) :]) == project_tokenizer.decode(expected[len(ids) :])


def test_complete_hf_adds_config_and_tokenizer_to_bare_weights(tmp_path):
    """What TorchTitan's last_save_in_hf writes under -m torchtitan.train is weights only."""
    _random_debug_checkpoint(tmp_path / "dcp")
    out = tmp_path / "hf"
    main(["dcp-to-hf", str(tmp_path / "dcp"), str(out), "--flavor", "debugmodel",
          "--tokenizer", str(DEBUG_ASSETS)])  # fmt: skip
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        (out / name).unlink()
    with pytest.raises(ValueError, match="Should have a `model_type` key in its config.json"):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    assert main(["complete-hf", str(out), "--flavor", "debugmodel",
                 "--tokenizer", str(DEBUG_ASSETS)]) == 0  # fmt: skip
    transformers.AutoTokenizer.from_pretrained(out)
    transformers.AutoModelForCausalLM.from_pretrained(out)


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path, capsys):
    _random_debug_checkpoint(tmp_path / "dcp")
    small = dict(CONFIG, vocab_size=64)
    (tmp_path / "config.json").write_text(json.dumps(small))
    code = main(["complete-hf", str(tmp_path / "x"), "--hf-config", str(tmp_path / "config.json"),
                 "--tokenizer", str(DEBUG_ASSETS)])  # fmt: skip
    assert code == 2
    assert "more than the model's vocab_size 64" in capsys.readouterr().err
