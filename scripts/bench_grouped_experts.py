"""Time the routed experts' two paths, torch._grouped_mm and the per-expert loop, in one process.

    python scripts/bench_grouped_experts.py [--shapes debug,nano] [--dtypes float32,bfloat16] [--repeats 7]

Each measurement is one forward and backward of `TrinityExperts` (tokens sorted by expert, as the
MoE layer hands them over; the grouped path includes TorchTitan's padding wrapper, as in training)
with an upstream gradient of ones / 3. The two paths run in turn (grouped, loop, grouped, ...) so
that a drift in the machine's speed hits both alike; the medians are printed as one JSON line per
(shape, dtype), with min and max to show the spread. `bfloat16` means bf16 weights and inputs (FSDP's
mixed precision); `autocast` fp32 weights under bf16 autocast (one rank).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from trinity_titan.model.moe import TrinityExperts


@dataclass(frozen=True)
class Shape:
    dim: int
    hidden: int
    experts: int
    top_k: int
    tokens: int


SHAPES = {
    # the debug flavor's MoE layers, one rank's local batch of 8 x 128 tokens
    "debug": Shape(dim=128, hidden=64, experts=8, top_k=2, tokens=8 * 128),
    # Trinity Nano's MoE layer (dim 1024, 128 experts of 256, top-8) on 2048 tokens
    "nano": Shape(dim=1024, hidden=256, experts=128, top_k=8, tokens=2048),
}


def routed_counts(shape: Shape, gen: torch.Generator) -> torch.Tensor:
    """Tokens per expert of a random top-k choice (distinct experts per token)."""
    scores = torch.rand(shape.tokens, shape.experts, generator=gen)
    chosen = scores.topk(shape.top_k, dim=-1).indices.reshape(-1)
    return torch.bincount(chosen, minlength=shape.experts)


def time_pair(shape: Shape, mode: str, repeats: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    experts = TrinityExperts(shape.dim, shape.hidden, shape.experts, True, "torch")
    with torch.no_grad():
        experts.init_weights(0.02)
    param_dtype = torch.bfloat16 if mode == "bfloat16" else torch.float32
    experts.to(param_dtype)
    counts = routed_counts(shape, gen)
    x = torch.randn(int(counts.sum()), shape.dim, generator=gen).to(param_dtype)
    x.requires_grad_(True)
    grad = torch.full((x.shape[0], shape.dim), 1 / 3, dtype=param_dtype)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else nullcontext()

    def step(grouped: bool) -> float:
        experts.use_grouped_mm = grouped
        experts.zero_grad(set_to_none=True)
        x.grad = None
        start = time.perf_counter()
        with amp:
            out = experts(x, counts)
        out.backward(grad.to(out.dtype))
        return time.perf_counter() - start

    step(True), step(False)  # warm-up
    times: dict[str, list[float]] = {"grouped_mm": [], "loop": []}
    for _ in range(repeats):
        times["grouped_mm"].append(step(True))
        times["loop"].append(step(False))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "shape": shape.__dict__,
        "mode": mode,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        **{
            f"{k}_ms": [round(1e3 * min(v), 2), round(1e3 * med[k], 2), round(1e3 * max(v), 2)]
            for k, v in times.items()
        },  # fmt: skip
        "loop_over_grouped": round(med["loop"] / med["grouped_mm"], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="debug,nano")
    p.add_argument("--dtypes", default="float32,bfloat16,autocast")
    p.add_argument("--repeats", type=int, default=7)
    opts = p.parse_args()
    for name in opts.shapes.split(","):
        for mode in opts.dtypes.split(","):
            print(json.dumps({"name": name, **time_pair(SHAPES[name], mode, opts.repeats)}))


if __name__ == "__main__":
    main()
