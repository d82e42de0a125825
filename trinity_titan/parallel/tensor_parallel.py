"""Tensor + sequence parallel plan for Trinity's non-MoE modules (TorchTitan's parallel styles).

Between modules, activations are the local sequence shard (Shard(1)). Attention projections
(q, k, v and the output gate) are column-parallel over heads and `wo` is row-parallel; QK-norm
normalises each head's vector, so it runs on the local heads with a replicated gain
(`SequenceParallel(sequence_dim=2)` declares the heads dim sharded, and DTensor sums the gain's
gradient over TP). All four sandwich norms are sequence-parallel.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torchtitan.tools.logging import logger


class ReplicatedHead(ParallelStyle):
    """The LM head whole on every TP rank: its weight a replicated DTensor, its input the whole
    sequence (all-gathered from the sequence shards), its output local. The fused loss then runs
    on every TP rank unchanged, and no [tokens, vocab] logits are gathered."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for key, param in list(mod.named_parameters(recurse=False)):
                replicated = nn.Parameter(distribute_tensor(param, mesh, [Replicate()]))
                mod.register_parameter(key, replicated)

        def prepare_input(mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
            h = inputs[0]
            if not isinstance(h, DTensor):
                h = DTensor.from_local(h, mesh, [Shard(1)], run_check=False)
            return (h.redistribute(placements=[Replicate()]), *inputs[1:])

        def prepare_output(mod: nn.Module, outputs: Any, mesh: DeviceMesh) -> Any:
            return outputs.to_local() if isinstance(outputs, DTensor) else outputs

        return distribute_module(module, device_mesh, partition, prepare_input, prepare_output)


def apply_trinity_tp(model: nn.Module, tp_mesh: DeviceMesh, replicate_head: bool = False) -> None:
    """The TP plan. The LM head is column-parallel over the vocabulary with replicated logits, or,
    with `replicate_head` (the fused loss), not TP-sharded at all: every TP rank gets the whole
    sequence's hidden states and the whole (FSDP-sharded) head, so the fused linear cross-entropy
    runs unchanged and no [tokens, vocab] logits are ever gathered."""
    head = (
        ReplicatedHead()
        if replicate_head
        else ColwiseParallel(
            input_layouts=Shard(1), output_layouts=Replicate(), use_local_output=True
        )
    )
    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "output": head,
        },
    )
    for block in model.layers.values():
        plan = {
            "attention_norm": SequenceParallel(use_local_output=True),
            # (x, rope_cache, masks, positions): only x is sharded
            "attention": PrepareModuleInput(
                input_layouts=(Shard(1), None, None, None),
                desired_input_layouts=(Replicate(), None, None, None),
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wg": ColwiseParallel(),
            "attention.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
            "attention.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_norm": SequenceParallel(use_local_output=True),
            "ffn_norm": SequenceParallel(use_local_output=True),
            "post_ffn_norm": SequenceParallel(use_local_output=True),
        }
        if not block.moe_enabled:
            plan.update(
                {
                    "feed_forward": PrepareModuleInput(
                        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                    ),
                    "feed_forward.w1": ColwiseParallel(),
                    "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
                    "feed_forward.w3": ColwiseParallel(),
                }
            )
        parallelize_module(block, tp_mesh, plan)
    logger.info("Applied tensor parallelism to the model")
