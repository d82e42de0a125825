"""Model construction, initialisation, parameter counts, and the SDPA/flex kernels."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from trinity_titan.model import TrinityModel, trinity_flavors
from trinity_titan.model.args import count_params
from trinity_titan.model.attention import sliding_window_mask


@pytest.mark.parametrize(
    "flavor, total, active",
    [
        ("nano", (5.5e9, 6.5e9), (0.9e9, 1.2e9)),
        ("mini", (24e9, 28e9), (2.7e9, 3.5e9)),
        ("large", (398e9, 400e9), (12.5e9, 14e9)),
    ],
)
def test_parameter_counts_on_meta(flavor, total, active):
    args = copy.deepcopy(trinity_flavors[flavor])
    with torch.device("meta"):
        model = TrinityModel(args)
    counts = count_params(args, model)
    assert total[0] <= counts["total"] <= total[1], counts
    assert active[0] <= counts["active"] <= active[1], counts
    nparams, flops = args.get_nparams_and_flops(model, args.max_seq_len)
    assert nparams == counts["total"]
    assert flops > 6 * (counts["active"] - counts["embedding"])


def test_debug_flavor_shape_requirements(debug_args):
    a = debug_args
    assert a.n_dense_layers >= 2 and a.n_layers - a.n_dense_layers >= 2
    assert any(a.is_global_layer(i) for i in range(a.n_layers))
    assert a.sliding_window < a.max_seq_len
    assert a.n_kv_heads < a.n_heads


def test_init_follows_the_report(debug_args):
    model = TrinityModel(debug_args)
    model.init_weights(buffer_device=torch.device("cpu"))
    sigma = 0.5 / math.sqrt(debug_args.dim)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            assert p.abs().max() <= 3 * sigma + 1e-7, name
            # The std of a normal cut at +-3 sigma is 0.9866 sigma.
            assert abs(p.std().item() - 0.9866 * sigma) < 0.1 * sigma, name
    gain = 1 / math.sqrt(debug_args.n_layers)
    block = model.layers["0"]
    assert torch.allclose(
        block.post_attention_norm.weight, torch.full_like(block.post_attention_norm.weight, gain)
    )
    assert torch.allclose(
        block.post_ffn_norm.weight, torch.full_like(block.post_ffn_norm.weight, gain)
    )
    assert torch.all(block.attention_norm.weight == 1) and torch.all(
        block.attention.q_norm.weight == 1
    )
    moe = model.layers["3"].moe
    assert moe.expert_bias.dtype == torch.float32 and not moe.expert_bias.requires_grad
    assert "layers.3.moe.expert_bias" in model.state_dict()
    assert moe.experts.w1.shape == (
        debug_args.num_experts,
        debug_args.moe_hidden_dim,
        debug_args.dim,
    )


def test_sliding_window_mask_semantics():
    m = sliding_window_mask(6, 3)
    assert m[5].tolist() == [False, False, False, True, True, True]
    assert m[0].tolist() == [True, False, False, False, False, False]


def _sdpa_and_flex(args) -> tuple[TrinityModel, TrinityModel]:
    """The same random weights with `args.attn_type` 'sdpa' and 'flex'."""
    torch.manual_seed(0)
    model = TrinityModel(args)
    model.init_weights(buffer_device=torch.device("cpu"))
    flex_args = copy.deepcopy(args)
    flex_args.attn_type = "flex"
    flex = TrinityModel(flex_args)
    flex.load_state_dict(model.state_dict())
    return model, flex


def test_sdpa_and_flex_forward_agree(debug_args):
    model, flex = _sdpa_and_flex(debug_args)
    tokens = torch.randint(0, debug_args.vocab_size, (2, debug_args.max_seq_len))
    with torch.no_grad():
        torch.testing.assert_close(flex(tokens), model(tokens), atol=1e-5, rtol=1e-5)


def test_document_masking_sdpa_equals_flex_and_separates_documents(debug_args):
    """SDPA's explicit document mask against flex with TorchTitan's document mask_mod; and a
    document's outputs do not depend on the tokens of the documents before it."""
    eos = SimpleNamespace(eos_id=0)
    debug_args.attn_mask_type = "block_causal"
    model, flex = _sdpa_and_flex(debug_args)
    seq = debug_args.max_seq_len
    tokens = torch.randint(1, debug_args.vocab_size, (2, seq))
    tokens[0, [17, 70]] = 0  # row 0: three documents, the last longer than the window
    tokens[1, 40] = 0
    with torch.no_grad():
        out = model(tokens, model.get_attention_masks(tokens, eos))
        torch.testing.assert_close(
            flex(tokens, flex.get_attention_masks(tokens, eos)), out, atol=1e-5, rtol=1e-5
        )
        # new tokens in row 0's first two documents leave its third unchanged
        other = tokens.clone()
        other[0, :70] = torch.randint(1, debug_args.vocab_size, (70,))
        other[0, 17] = 0
        again = model(other, model.get_attention_masks(other, eos))
        torch.testing.assert_close(again[0, 71:], out[0, 71:], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(again[0, :70], out[0, :70])


def test_invalid_args_fail_with_the_field(debug_args):
    debug_args.n_kv_heads = 3
    with pytest.raises(ValueError, match="n_kv_heads"):
        TrinityModel(debug_args)
