"""Routed experts: the torch._grouped_mm path equals the per-expert loop, values and gradients.

Both paths compute the same products in the same dtype: fp32, bf16 (FSDP's mixed precision: bf16
weights and inputs) and bf16 autocast (fp32 weights, one rank); they may sum a dot product in
another order (the padding changes the group sizes; on CUDA the bf16 grouped kernel is CUTLASS,
the loop cuBLAS), so they agree to the rounding of that dtype. Every case has an expert without tokens, and the padding rows TorchTitan adds: its
`indices_padding_wrapper` (the path without expert parallelism) and the layout its all-to-all
dispatch hands the experts under expert parallelism (`_permute` over 2 EP ranks). Upstream
gradients are random / 3, not ones, so that a wrong scale or a missing rounding shows.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from torchtitan.models.moe.utils import _permute

from tests.fixtures import debug_job_config
from trinity_titan.model import TrinityModel, TrinityModelArgs, trinity_flavors
from trinity_titan.model.moe import TrinityExperts

DIM, HIDDEN, EXPERTS = 24, 16, 4
COUNTS = [5, 0, 9, 3]  # expert 1 gets no tokens
MODES = ["float32", "bfloat16", "autocast"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def make_experts(mode: str, device: str) -> TrinityExperts:
    experts = TrinityExperts(DIM, HIDDEN, EXPERTS, use_grouped_mm=True, backend="torch")
    with torch.no_grad():
        for w in (experts.w1, experts.w2, experts.w3):
            w.normal_(std=0.3)
    dtype = torch.bfloat16 if mode == "bfloat16" else torch.float32
    return experts.to(device=device, dtype=dtype)


def run(experts: TrinityExperts, grouped: bool, mode: str, x: torch.Tensor, counts, grad, call):
    """Output and the gradients of (x, w1, w2, w3) of one path."""
    experts.use_grouped_mm = grouped
    experts.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    amp = (
        torch.autocast(x.device.type, dtype=torch.bfloat16) if mode == "autocast" else nullcontext()
    )
    with amp:
        out = call(experts, x, counts)
    out.backward(grad.to(out.dtype))
    return out.detach(), [x.grad, experts.w1.grad, experts.w2.grad, experts.w3.grad]


def assert_same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Equal up to the summation order of a dot product: BLAS kernels pick their blocking by
    the matrix sizes, and padding changes the group sizes (an fp32 mm of 3 rows and of 8 rows
    round differently). fp32: a few ulps of the largest entry. bf16 results are rounded once
    from an fp32 accumulator, so they differ by at most an ulp (2^-8 relative) where they do,
    and almost all entries are equal."""
    if a.dtype == torch.float32:
        rtol, atol = 1e-5, 1e-5 * b.abs().max().item()
    else:
        rtol, atol = 2**-7, 1e-4 * b.abs().max().item()
        # An ulp flip needs the two fp32 sums to straddle a rounding boundary: rare. A
        # systematic error (a rounding or a scale too many) moves about half of the entries.
        equal = (a == b).float().mean().item()
        assert equal > 0.9, (what, equal)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=what)


def compare(mode: str, device: str, x: torch.Tensor, counts: torch.Tensor, call):
    experts = make_experts(mode, device)
    grad = torch.randn(x.shape[0], DIM, device=device) / 3
    out_g, grads_g = run(experts, True, mode, x, counts, grad, call)
    out_l, grads_l = run(experts, False, mode, x, counts, grad, call)
    expected_dtype = torch.float32 if mode == "float32" else torch.bfloat16
    assert out_g.dtype == out_l.dtype == expected_dtype
    assert_same(out_g, out_l, "output")
    for name, g, ref in zip(("x", "w1", "w2", "w3"), grads_g, grads_l, strict=True):
        assert g.dtype == ref.dtype and g.abs().max() > 0, name
        assert_same(g, ref, f"grad {name}")
    for w in grads_g[1:]:  # the expert without tokens gets no gradient
        assert w[1].abs().max() == 0
    return out_g, grads_g[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_grouped_equals_loop_through_the_padding_wrapper(mode, device):
    """Without expert parallelism the grouped path pads each group to TorchTitan's alignment."""
    counts = torch.tensor(COUNTS, device=device)
    x = torch.randn(sum(COUNTS), DIM, device=device)
    if mode == "bfloat16":
        x = x.bfloat16()
    compare(mode, device, x, counts, lambda experts, x, counts: experts(x, counts))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_grouped_equals_loop_on_expert_parallel_padding(mode, device):
    """The rows TorchTitan's EP dispatch hands over: per-rank groups merged per local expert,
    each padded to the alignment with zero rows, then a tail of zero rows. The padding rows get
    a zero output and a zero gradient, although their upstream gradient is not zero."""
    ep, local = 2, EXPERTS
    counts_from_ranks = torch.tensor([3, 0, 4, 1, 2, 0, 5, 2])  # [rank, local expert]
    tokens = torch.randn(int(counts_from_ranks.sum()), DIM)
    _, padded, indices, padded_counts = _permute(tokens, counts_from_ranks, ep, local)
    padding = indices == -1  # rows taken from the zero row TorchTitan appends
    assert padding.sum() > padded_counts.sum() - counts_from_ranks.sum()  # a tail beyond the groups
    dtype = torch.bfloat16 if mode == "bfloat16" else torch.float32
    x = padded.to(device=device, dtype=dtype)

    def experts_on_dispatched_rows(experts, x, counts):
        # What TrinityExperts.forward runs under EP: no padding wrapper, the rows as dispatched.
        w1, w2, w3 = experts.w1, experts.w2, experts.w3
        if experts.use_grouped_mm:
            return experts._grouped_mm(w1, w2, w3, x, counts)
        return experts._per_expert_loop(w1, w2, w3, x, counts)

    out, x_grad = compare(mode, device, x, padded_counts.to(device), experts_on_dispatched_rows)
    padding = padding.to(device)
    assert out[padding].abs().max() == 0 and out[~padding].abs().min() > 0
    assert x_grad[padding].abs().max() == 0


def test_grouped_mm_default_is_per_device_and_moe_overrides_it():
    """Grouped on CUDA, the loop on CPU (measured, docs/benchmarks.md); `[moe]` sets either."""
    assert TrinityModelArgs().use_grouped_mm is torch.cuda.is_available()
    for value in (True, False):
        args = copy.deepcopy(trinity_flavors["debugmodel"])
        args.update_from_config(debug_job_config("--moe.use_grouped_mm", str(value)))
        assert args.use_grouped_mm is value
        with torch.device("meta"):
            model = TrinityModel(args)
        assert all(model.layers[i].moe.experts.use_grouped_mm is value for i in ("2", "3"))
    args = TrinityModelArgs(use_grouped_mm=True)
    args.update_from_config(debug_job_config())  # None keeps the model's value
    assert args.use_grouped_mm is True


def test_grouped_mm_with_unaligned_widths_fails_with_the_fix():
    """torch._grouped_mm rejects bf16 rows that are not a multiple of 16 bytes, deep in a
    forward; the model args say so at construction, with the option that avoids it."""
    args = copy.deepcopy(trinity_flavors["debugmodel"])
    args.moe_hidden_dim, args.use_grouped_mm = 60, True
    with pytest.raises(ValueError, match=r"moe_hidden_dim \(60\).*use_grouped_mm = false"):
        TrinityModel(args)
    args.use_grouped_mm = False
    TrinityModel(args)
