"""Trinity vs transformers' AfmoeForCausalLM (the independent reference), through the HF on-disk layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from trinity_titan.model import TrinityModel, TrinityModelArgs
from trinity_titan.model.state_dict_adapter import TrinityStateDictAdapter

transformers = pytest.importorskip("transformers")

HF_CONFIG = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=4,  # 1 dense + 3 MoE; layer 3 global, 0-2 local
    num_dense_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    head_dim=8,
    num_experts=6,
    num_experts_per_tok=2,
    num_shared_experts=1,
    route_scale=2.5,
    sliding_window=5,
    global_attn_every_n_layers=4,
    mup_enabled=True,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def _random_hf_model(tmp_path):
    """HF model with every weight random (HF zeroes router and bias, making top-k ties)."""
    torch.manual_seed(1)
    config = transformers.AfmoeConfig(**HF_CONFIG)
    config._attn_implementation = "eager"
    hf = transformers.AfmoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("expert_bias"):
                p.copy_(torch.randn_like(p) * 0.05)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.15)
    hf.save_pretrained(tmp_path)
    hf_sd = load_file(str(tmp_path / "model.safetensors"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    return hf, hf_sd, cfg


def _trinity_from_hf(hf_sd, cfg, **overrides) -> TrinityModel:
    args = TrinityModelArgs.from_hf_config(cfg, use_grouped_mm=False, **overrides)
    model = TrinityModel(args)
    adapter = TrinityStateDictAdapter(args, None)
    missing, unexpected = model.load_state_dict(adapter.from_hf(hf_sd), strict=False)
    assert not unexpected
    assert set(missing) == set(), missing
    return model.eval()


@pytest.mark.parametrize("attn_type", ["sdpa", "flex"])
def test_logits_match_hf(tmp_path, attn_type):
    hf, hf_sd, cfg = _random_hf_model(tmp_path)
    ours = _trinity_from_hf(hf_sd, cfg, attn_type=attn_type)
    assert ours.model_args.sliding_window < 20
    tokens = torch.randint(0, HF_CONFIG["vocab_size"], (2, 20))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_hf_config_round_trip(tmp_path):
    _, _, cfg = _random_hf_model(tmp_path)
    args = TrinityModelArgs.from_hf_config(cfg)
    again = TrinityModelArgs.from_hf_config(args.to_hf_config())
    assert again == args
    legacy = {k: v for k, v in cfg.items() if k != "rope_parameters"} | {"rope_theta": 5000.0}
    assert TrinityModelArgs.from_hf_config(legacy).rope_theta == 5000.0


def test_adapter_round_trip_is_exact(tmp_path):
    _, hf_sd, cfg = _random_hf_model(tmp_path)
    adapter = TrinityStateDictAdapter(TrinityModelArgs.from_hf_config(cfg), None)
    titan = adapter.from_hf(hf_sd)
    assert titan["layers.1.moe.experts.w1"].shape == (6, 16, 32)
    back = adapter.to_hf(titan)
    assert set(back) == set(hf_sd)
    for key, value in hf_sd.items():
        assert torch.equal(back[key], value), key


def test_adapter_rejects_incomplete_experts(tmp_path):
    _, hf_sd, cfg = _random_hf_model(tmp_path)
    del hf_sd["model.layers.2.mlp.experts.3.up_proj.weight"]
    adapter = TrinityStateDictAdapter(TrinityModelArgs.from_hf_config(cfg), None)
    with pytest.raises(ValueError, match="incomplete routed experts"):
        adapter.from_hf(hf_sd)


def test_train_spec_exposes_the_adapter(tmp_path):
    from torchtitan.protocols.train_spec import get_train_spec

    import trinity_titan  # noqa: F401  (registers the spec)

    _, hf_sd, cfg = _random_hf_model(tmp_path)
    spec = get_train_spec("trinity")
    adapter = spec.state_dict_adapter(TrinityModelArgs.from_hf_config(cfg), str(tmp_path))
    titan = adapter.from_hf(hf_sd)
    assert set(adapter.to_hf(titan)) == set(hf_sd)
