"""HF config.json -> TrinityModelArgs: every setting the model cannot honour is refused by name,
and `[model] hf_config` gives a job an HF config's shape."""

from __future__ import annotations

import json

import pytest

from tests.fixtures import NANO_HF_CONFIG, debug_job_config
from trinity_titan.job_config import ConfigError
from trinity_titan.model import TrinityModelArgs, trinity_flavors
from trinity_titan.model.args import HF_REQUIRED
from trinity_titan.training.checks import check_job

transformers = pytest.importorskip("transformers")


def test_the_published_nano_config_is_the_nano_flavor():
    args = TrinityModelArgs.from_hf_config(NANO_HF_CONFIG)
    nano = trinity_flavors["nano"]
    for name in (
        "vocab_size",
        "dim",
        "n_layers",
        "n_dense_layers",
        "ffn_hidden_dim",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "sliding_window",
        "num_experts",
        "top_k",
        "num_shared_experts",
        "moe_hidden_dim",
        "route_scale",
        "mup_enabled",
        "context_len",
    ):
        assert getattr(args, name) == getattr(nano, name), name


@pytest.mark.parametrize(
    "key,value",
    [
        ("hidden_act", "gelu"),
        ("score_func", "softmax"),
        ("route_norm", False),
        ("n_group", 8),
        ("topk_group", 4),
        ("num_expert_groups", 8),
        ("num_limited_groups", 4),
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
        ("tie_word_embeddings", True),
        ("attention_bias", True),
        ("mlp_bias", True),
        ("attention_dropout", 0.1),
        ("model_type", "deepseek_v3"),
    ],
)
def test_a_setting_the_model_cannot_honour_is_refused_by_name(key, value):
    assert key in HF_REQUIRED
    with pytest.raises(ConfigError, match=rf"HF config {key} = .* is not supported"):
        TrinityModelArgs.from_hf_config(dict(NANO_HF_CONFIG, **{key: value}))


@pytest.mark.parametrize(
    "change,match",
    [
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_parameters"),
        ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "rope"),
        ({"layer_types": ["full_attention"] * 56}, "layer_types must follow"),
        ({"sliding_window": None}, "sliding_window = None"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
        ({"num_experts": None}, "lacks num_experts"),
    ],
)
def test_other_unsupported_configs_are_refused(change, match):
    with pytest.raises(ConfigError, match=match):
        TrinityModelArgs.from_hf_config(dict(NANO_HF_CONFIG, **change))


def test_what_transformers_writes_for_afmoe_is_accepted(tmp_path):
    """Every key transformers' AfmoeConfig saves is known (mapped, checked or inert)."""
    config = transformers.AfmoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        moe_intermediate_size=8,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    )
    config.save_pretrained(tmp_path)
    args = TrinityModelArgs.from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    assert (args.context_len, args.num_shared_experts, args.n_dense_layers) == (512, 2, 1)
    assert TrinityModelArgs.from_hf_config(args.to_hf_config()) == args


def test_a_job_takes_its_shape_from_an_hf_config(tmp_path):
    """A shape that no flavor has: 3 layers, 6 experts top-3, 96 wide; the flavor (debugmodel)
    keeps what is not shape (its balancing defaults); training.seq_len stays the RoPE length."""
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
    args = check_job(debug_job_config("--model.hf_config", str(path)), 1, trinity_trainer=True)
    args = args.model_args
    assert (args.dim, args.n_layers, args.num_experts, args.top_k) == (96, 3, 6, 3)
    assert (args.context_len, args.max_seq_len) == (1024, 128)
    assert args.sigma == pytest.approx(0.5 / 96**0.5)
    assert args.balance_method == "aux_free"


def test_a_bad_hf_config_path_names_the_option(tmp_path):
    with pytest.raises(ConfigError, match=r"\[model\] hf_config = .* is not a file"):
        check_job(debug_job_config("--model.hf_config", str(tmp_path / "no.json")), 1,
                  trinity_trainer=True, files=False)  # fmt: skip
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match=r"is not valid JSON"):
        check_job(debug_job_config("--model.hf_config", str(tmp_path / "bad.json")), 1,
                  trinity_trainer=True, files=False)  # fmt: skip
