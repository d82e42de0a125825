"""Conversion between Trinity's TorchTitan state dict and the HF AFMoE on-disk layout.

HF stores one tensor per routed expert (`mlp.experts.{e}.gate_proj.weight`); Trinity stacks them
into 3-D `moe.experts.w1/w2/w3`. TorchTitan's MoEStateDictAdapter provides the (DTensor-aware)
splitting and stacking; this class only supplies the key map.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torchtitan.models.utils import MoEStateDictAdapter

from trinity_titan.model.args import TrinityModelArgs

_LAYER = "model.layers.{}"

FROM_HF: dict[str, str] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    f"{_LAYER}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    f"{_LAYER}.post_attention_layernorm.weight": "layers.{}.post_attention_norm.weight",
    f"{_LAYER}.pre_mlp_layernorm.weight": "layers.{}.ffn_norm.weight",
    f"{_LAYER}.post_mlp_layernorm.weight": "layers.{}.post_ffn_norm.weight",
    f"{_LAYER}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    f"{_LAYER}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    f"{_LAYER}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    f"{_LAYER}.self_attn.gate_proj.weight": "layers.{}.attention.wg.weight",
    f"{_LAYER}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    f"{_LAYER}.self_attn.q_norm.weight": "layers.{}.attention.q_norm.weight",
    f"{_LAYER}.self_attn.k_norm.weight": "layers.{}.attention.k_norm.weight",
    # dense layers
    f"{_LAYER}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    f"{_LAYER}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    f"{_LAYER}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    # MoE layers
    f"{_LAYER}.mlp.router.gate.weight": "layers.{}.moe.router.gate.weight",
    f"{_LAYER}.mlp.expert_bias": "layers.{}.moe.expert_bias",
    f"{_LAYER}.mlp.shared_experts.gate_proj.weight": "layers.{}.moe.shared_experts.w1.weight",
    f"{_LAYER}.mlp.shared_experts.up_proj.weight": "layers.{}.moe.shared_experts.w3.weight",
    f"{_LAYER}.mlp.shared_experts.down_proj.weight": "layers.{}.moe.shared_experts.w2.weight",
    f"{_LAYER}.mlp.experts.{{}}.gate_proj.weight": "layers.{}.moe.experts.w1",
    f"{_LAYER}.mlp.experts.{{}}.up_proj.weight": "layers.{}.moe.experts.w3",
    f"{_LAYER}.mlp.experts.{{}}.down_proj.weight": "layers.{}.moe.experts.w2",
}
TO_HF: dict[str, str] = {v: k for k, v in FROM_HF.items()}

# Training state with no HF counterpart (SMEBU's momentum): dropped by to_hf, zero-filled by from_hf.
_MOMENTUM = "moe.expert_bias_momentum"


def _abstract(key: str, count: int) -> tuple[str, list[str]]:
    """Replace the first `count` integers in `key` with {} and return them."""
    return re.sub(r"\d+", "{}", key, count=count), re.findall(r"\d+", key)[:count]


class TrinityStateDictAdapter(MoEStateDictAdapter):
    """`to_hf` / `from_hf` for Trinity; works on plain tensors (offline) and DTensors (training)."""

    model_args: TrinityModelArgs

    def __init__(self, model_args: TrinityModelArgs, hf_assets_path: str | None) -> None:
        super().__init__(model_args, hf_assets_path)

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        hf: dict[str, Any] = {}
        num_experts = self.model_args.num_experts
        for key, value in state_dict.items():
            if key.endswith(_MOMENTUM):
                continue
            if ".moe.experts." in key:
                titan_abstract, (layer,) = _abstract(key, 1)
                hf_abstract = TO_HF[_unknown_guard(titan_abstract, TO_HF)]  # {layer}, {expert}
                if isinstance(value, DTensor):
                    # Remember the sharding so from_hf can rebuild the same DTensor.
                    self.grouped_expert_weight_placements[titan_abstract] = value.placements
                    self.grouped_expert_weight_shape[titan_abstract] = value.shape
                    self.grouped_expert_weight_mesh[titan_abstract] = value.device_mesh
                    hf.update(
                        self._get_local_experts_weights(hf_abstract, titan_abstract, layer, value)
                    )
                else:
                    for e, w in enumerate(self._split_experts_weights(value, num_experts)):
                        hf[hf_abstract.format(layer, e)] = w.squeeze(0)
            elif key.startswith("layers."):
                abstract, (layer,) = _abstract(key, 1)
                hf[TO_HF[_unknown_guard(abstract, TO_HF)].format(layer)] = value
            else:
                hf[TO_HF[_unknown_guard(key, TO_HF)]] = value
        return hf

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict: dict[str, Any] = {}
        experts_by_layer: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
        num_experts = self.model_args.num_experts
        for key, value in hf_state_dict.items():
            if ".mlp.experts." in key:
                hf_abstract, (layer, expert) = _abstract(key, 2)
                titan_abstract = FROM_HF[_unknown_guard(hf_abstract, FROM_HF)]
                experts_by_layer.setdefault(layer, {}).setdefault(titan_abstract, {})[
                    int(expert)
                ] = value
                if titan_abstract in self.local_experts_indices:
                    stacked = self._concatenate_expert_weights_dtensor(
                        experts_by_layer, titan_abstract, layer
                    )
                else:
                    stacked = self._concatenate_expert_weights(
                        experts_by_layer, titan_abstract, layer, num_experts
                    )
                if stacked is not None:
                    state_dict[titan_abstract.format(layer)] = stacked
            elif key.startswith("model.layers."):
                abstract, (layer,) = _abstract(key, 1)
                state_dict[FROM_HF[_unknown_guard(abstract, FROM_HF)].format(layer)] = value
                if key.endswith(".mlp.expert_bias"):
                    state_dict.setdefault(f"layers.{layer}.{_MOMENTUM}", torch.zeros_like(value))
            else:
                state_dict[FROM_HF[_unknown_guard(key, FROM_HF)]] = value
        missing = {k: len(v) for layer in experts_by_layer.values() for k, v in layer.items()}
        if missing:
            raise ValueError(
                f"incomplete routed experts in the HF state dict (key: experts found): {missing}"
            )
        return state_dict


def _unknown_guard(key: str, mapping: dict[str, str]) -> str:
    if key not in mapping:
        raise KeyError(f"no Trinity <-> HF mapping for state dict key {key!r}")
    return key
