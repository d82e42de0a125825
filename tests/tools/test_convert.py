"""HF <-> DCP conversion: exact round trip through sharded safetensors, and HF reloads the output."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from trinity_titan.model import TrinityModel, TrinityModelArgs
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
    with pytest.raises(FileNotFoundError, match="not a DCP checkpoint"):
        main(["dcp-to-hf", str(tmp_path), str(tmp_path / "out"), "--flavor", "debugmodel"])
    with pytest.raises(SystemExit, match="unknown --flavor"):
        main(["dcp-to-hf", str(tmp_path), str(tmp_path / "out"), "--flavor", "tiny"])


@pytest.mark.slow
def test_training_starts_from_an_hf_checkpoint(tmp_path):
    """TorchTitan's own HF-loading path (initial_load_in_hf) starts exactly where the DCP seed does."""
    from tests.distributed.launch import from_seed, make_seed_checkpoint, run_train

    seed = make_seed_checkpoint(tmp_path / "seed")
    main(["dcp-to-hf", str(seed), str(tmp_path / "hf"), "--flavor", "debugmodel",
          "--max-shard-size-gb", "0.001"])  # fmt: skip
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    train = ("--training.steps", "3", "--parallelism.data_parallel_shard_degree", "2")
    from_dcp, _ = run_train(tmp_path / "a", 2, *train, *from_seed(seed))
    from_hf, log = run_train(
        tmp_path / "b", 2, *train, "--checkpoint.enable",
        "--checkpoint.initial_load_path", str(tmp_path / "hf"), "--checkpoint.initial_load_in_hf",
    )  # fmt: skip
    assert "loading from HF safetensors" in log
    assert from_hf == pytest.approx(from_dcp, rel=1e-6, abs=1e-6) and len(from_hf) == 3
