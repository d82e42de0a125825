"""trinity_titan.kernels: the PyTorch paths against naive references written here (values and
gradients), the backend switch, the fused head in the model; on CUDA, Liger against PyTorch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from trinity_titan.job_config import ConfigError
from trinity_titan.kernels import (
    LossTerms,
    fused_linear_cross_entropy,
    resolve_backend,
    rms_norm,
    silu_mul,
)
from trinity_titan.model import TrinityModel
from trinity_titan.model.lm_head import FusedLoss
from trinity_titan.model.moe import TrinityExperts
from trinity_titan.training.checks import check_job

cuda = pytest.mark.cuda  # Liger's kernels need CUDA (skipped without it: tests/conftest.py)


# ---------------------------------------------------------------------------- references
def naive_terms(hidden, weight, labels, z_coeff, ignore_index=-100):
    """Loss terms from fully materialised fp64 logits (F.cross_entropy + PaLM z-loss)."""
    logits = hidden.double() @ weight.double().t()
    valid = labels != ignore_index
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    z = torch.logsumexp(logits[valid], dim=-1).square().sum()
    rows = logits[valid]
    return dict(
        loss_sum=ce + z_coeff * z,
        ce_sum=ce,
        z_sum=z,
        logit_max=rows.max() if rows.numel() else torch.tensor(float("-inf")),
        logit_sum=rows.sum(),
        num_valid=valid.sum(),
    )


def make_problem(n=53, d=24, v=70, dtype=torch.float32, ignored=(0, 5, 6, 40)):
    hidden = torch.randn(n, d, dtype=dtype, requires_grad=True)
    weight = (0.5 * torch.randn(v, d)).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,))
    labels[list(ignored)] = -100
    return hidden, weight, labels


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


# ---------------------------------------------------------------------------- fused CE, torch path
@pytest.mark.parametrize("chunk_size", [1, 7, 53, 4096])
@pytest.mark.parametrize("z_coeff", [0.0, 1e-2])
def test_fused_ce_matches_materialised_logits(chunk_size, z_coeff):
    hidden, weight, labels = make_problem()
    terms = fused_linear_cross_entropy(
        hidden, weight, labels, z_loss_coeff=z_coeff, chunk_size=chunk_size
    )
    assert isinstance(terms, LossTerms)
    ref = naive_terms(hidden, weight, labels, z_coeff)
    for name in ("loss_sum", "ce_sum", "z_sum", "logit_max", "logit_sum"):
        got = getattr(terms, name)
        assert got.dtype == torch.float32 and got.ndim == 0, name
        torch.testing.assert_close(got.double(), ref[name], rtol=2e-6, atol=2e-4, msg=name)
    assert terms.num_valid.dtype == torch.int64 and terms.num_valid.item() == 49
    for name in ("ce_sum", "z_sum", "logit_max", "logit_sum"):
        assert not getattr(terms, name).requires_grad, name

    gh, gw = grads(terms.loss_sum, hidden, weight)
    rh, rw = grads(ref["loss_sum"], hidden, weight)
    torch.testing.assert_close(gh, rh.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw.float(), rtol=1e-5, atol=1e-6)
    assert gh[[0, 5, 6, 40]].abs().max() == 0  # ignored tokens get no gradient


def test_fused_ce_backward_scales_by_upstream_gradient():
    """The trainer backpropagates loss_sum / n_tokens: stored gradients must be scaled."""
    hidden, weight, labels = make_problem()
    terms = fused_linear_cross_entropy(hidden, weight, labels, z_loss_coeff=1e-3, chunk_size=16)
    gh, gw = grads(terms.loss_sum / 7.0 + 0.0 * terms.ce_sum, hidden, weight)
    ref = naive_terms(hidden, weight, labels, 1e-3)["loss_sum"] / 7.0
    rh, rw = grads(ref, hidden, weight)
    torch.testing.assert_close(gh, rh.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, rw.float(), rtol=1e-5, atol=1e-7)


def test_fused_ce_all_tokens_ignored():
    hidden, weight, labels = make_problem(n=8, ignored=range(8))
    terms = fused_linear_cross_entropy(hidden, weight, labels, z_loss_coeff=1e-2, chunk_size=3)
    assert terms.loss_sum.item() == 0 and terms.num_valid.item() == 0
    gh, gw = grads(terms.loss_sum, hidden, weight)
    assert gh.abs().max() == 0 and gw.abs().max() == 0


def test_fused_ce_accumulates_in_fp32_with_bf16_inputs():
    """bf16 hidden and weight: loss terms in fp32; the weight gradient summed over 512 one-token
    chunks stays as accurate as one bf16 product (a bf16 accumulator is ~6x worse here)."""
    n, d, v = 512, 32, 300
    hidden = torch.randn(n, d).bfloat16().requires_grad_()
    weight = (0.3 * torch.randn(v, d)).bfloat16().requires_grad_()
    labels = torch.randint(0, v, (n,))
    terms = fused_linear_cross_entropy(hidden, weight, labels, z_loss_coeff=1e-4, chunk_size=1)
    assert terms.loss_sum.dtype == torch.float32
    ref = naive_terms(hidden, weight, labels, 1e-4)
    torch.testing.assert_close(terms.loss_sum.double(), ref["loss_sum"], rtol=1e-4, atol=0)
    gh, gw = grads(terms.loss_sum, hidden, weight)
    assert gh.dtype == gw.dtype == torch.bfloat16
    rh, rw = grads(ref["loss_sum"], hidden, weight)

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert rel(gw, rw) < 6e-3
    assert rel(gh, rh) < 6e-3


def test_fused_ce_under_autocast_matches_autocast_linear():
    """fp32 params under bf16 autocast (single-device mixed precision): the chunk matmuls run in
    bf16 as nn.Linear's would; the gradients come back in the parameters' dtype."""
    hidden, weight, labels = make_problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = fused_linear_cross_entropy(hidden, weight, labels, z_loss_coeff=1e-3, chunk_size=9)
        logits = F.linear(hidden, weight)
    assert logits.dtype == torch.bfloat16
    ref = naive_terms(logits.float(), torch.eye(logits.shape[-1]), labels, 1e-3)
    torch.testing.assert_close(terms.loss_sum.double(), ref["loss_sum"], rtol=1e-5, atol=0)
    gh, gw = grads(terms.loss_sum, hidden, weight)
    rh, rw = grads(ref["loss_sum"], hidden, weight)
    assert gh.dtype == gw.dtype == torch.float32
    for a, b in ((gh, rh), (gw, rw)):
        assert ((a.double() - b).norm() / b.norm()).item() < 1e-2


def test_fused_ce_accepts_leading_dims_and_rejects_mismatch():
    hidden, weight, labels = make_problem(n=12, ignored=())
    a = fused_linear_cross_entropy(hidden.view(3, 4, -1), weight, labels.view(3, 4))
    b = fused_linear_cross_entropy(hidden, weight, labels)
    assert torch.equal(a.loss_sum, b.loss_sum)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(hidden, weight, labels[:5])


@pytest.mark.parametrize("logit_stats", [True, False])
def test_liger_glue_against_installed_signature(monkeypatch, logit_stats):
    """The Liger path's call and its conversion to LossTerms, on CPU: the positional arguments
    are bound to the installed LigerFusedLinearCrossEntropyFunction.forward's signature, and a
    stand-in returns what Liger returns (loss incl. z-loss, z-loss scaled, both summed)."""
    import importlib
    import inspect

    import liger_kernel.ops

    flce = importlib.import_module("trinity_titan.kernels.fused_linear_cross_entropy")

    real = liger_kernel.ops.LigerFusedLinearCrossEntropyFunction
    hidden, weight, labels = make_problem()
    coeff = 1e-2
    seen = {}

    class StandIn:
        @staticmethod
        def apply(*args):
            bound = inspect.signature(real.forward).bind(None, *args)
            bound.apply_defaults()
            seen.update(bound.arguments)
            ref = naive_terms(args[0], args[1], args[2], bound.arguments["lse_square_scale"])
            z_scaled = bound.arguments["lse_square_scale"] * ref["z_sum"]
            return ref["loss_sum"].float(), z_scaled.to(args[0].dtype), None, None

    monkeypatch.setattr(liger_kernel.ops, "LigerFusedLinearCrossEntropyFunction", StandIn)
    terms = flce._liger_terms(hidden, weight, labels, coeff, -100, logit_stats)
    assert seen["_input"] is hidden and seen["weight"] is weight and seen["target"] is labels
    assert seen["bias"] is None and seen["ce_weight"] is None and seen["softcap"] is None
    assert seen["ignore_index"] == -100 and seen["lse_square_scale"] == coeff
    assert seen["label_smoothing"] == 0.0 and seen["reduction"] == "sum"
    assert seen["return_z_loss"] is True and seen["accum_dtype"] == torch.float32
    assert seen["use_token_scaling"] is False

    ref = naive_terms(hidden, weight, labels, coeff)
    names = ["loss_sum", "ce_sum", "z_sum", "logit_sum"] + (["logit_max"] if logit_stats else [])
    for name in names:
        torch.testing.assert_close(
            getattr(terms, name).double(), ref[name], rtol=1e-5, atol=1e-4, msg=name
        )
    assert logit_stats or torch.isnan(terms.logit_max)
    assert terms.num_valid.item() == ref["num_valid"].item()


def test_liger_norm_and_swiglu_calls_bind_to_installed_signatures(monkeypatch):
    """On CPU: route the liger branches to stand-ins that bind the arguments to the installed
    Liger Functions' forward signatures (AFMoE needs casting_mode gemma, offset 0, no in-place)."""
    import importlib
    import inspect

    import liger_kernel.ops

    seen = {}

    def stand_in(name, fallback):
        real = getattr(liger_kernel.ops, name)

        class StandIn:
            @staticmethod
            def apply(*args):
                bound = inspect.signature(real.forward).bind(None, *args)
                bound.apply_defaults()
                seen[name] = bound.arguments
                return fallback(*args[:3])

        monkeypatch.setattr(liger_kernel.ops, name, StandIn)

    stand_in("LigerRMSNormFunction", rms_norm)
    stand_in("LigerSiLUMulFunction", lambda a, b, *_: silu_mul(a, b))
    for module in ("rms_norm", "swiglu"):
        mod = importlib.import_module(f"trinity_titan.kernels.{module}")
        monkeypatch.setattr(mod, "use_liger", lambda backend, *tensors: backend == "liger")
    x, w = torch.randn(2, 3, 4, 8), torch.randn(8)
    assert torch.equal(rms_norm(x, w, 1e-5, "liger"), rms_norm(x, w, 1e-5, "torch"))
    args = seen["LigerRMSNormFunction"]
    assert args["X"] is x and args["W"] is w and args["eps"] == 1e-5
    assert args["offset"] == 0.0 and args["casting_mode"] == "gemma" and args["in_place"] is False
    gate, up = torch.randn(5, 6), torch.randn(5, 6)
    assert torch.equal(silu_mul(gate, up, "liger"), silu_mul(gate, up))
    args = seen["LigerSiLUMulFunction"]
    assert args["a"] is gate and args["b"] is up and args["gate_multiplier"] == 1.0


# ---------------------------------------------------------------------------- RMSNorm, SwiGLU
def naive_rms_norm(x, w, eps):
    """HF AFMoE's formula in fp64: w * x / sqrt(mean(x^2) + eps)."""
    x = x.double()
    return w.double() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("shape", [(3, 5, 16), (2, 5, 4, 8)])  # hidden states; [b, s, h, hd]
def test_rms_norm_torch_path(shape):
    x = torch.randn(shape, requires_grad=True)
    w = (1 + 0.3 * torch.randn(shape[-1])).requires_grad_()
    out = rms_norm(x, w, 1e-5)
    ref = naive_rms_norm(x, w, 1e-5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    g = torch.randn(shape)
    gx, gw = grads((out * g).sum(), x, w)
    rx, rw = grads((ref * g.double()).sum(), x, w)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)


def test_rms_norm_bf16_multiplies_weight_before_the_cast():
    """AFMoE: (w * normed_fp32).to(bf16): one rounding, unlike Llama's cast-then-multiply."""
    x = torch.randn(64, 32).bfloat16()
    w = (1 + 0.3 * torch.randn(32)).bfloat16()
    out = rms_norm(x, w, 1e-5)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, naive_rms_norm(x, w, 1e-5).to(torch.bfloat16))


def test_silu_mul_torch_path():
    gate = torch.randn(6, 10, requires_grad=True)
    up = torch.randn(6, 10, requires_grad=True)
    out = silu_mul(gate, up)
    ref = gate.double() / (1 + torch.exp(-gate.double())) * up.double()
    torch.testing.assert_close(out.double(), ref)
    g = torch.randn(6, 10)
    torch.testing.assert_close(
        grads((out * g).sum(), gate, up),
        tuple(t.float() for t in grads((ref * g.double()).sum(), gate, up)),
    )


def test_routed_experts_match_per_token_swiglu():
    """TrinityExperts on expert-sorted tokens == down(silu(gate x) * up x) token by token."""
    experts = TrinityExperts(
        dim=8, hidden_dim=6, num_experts=3, use_grouped_mm=False, backend="torch"
    )
    for w in (experts.w1, experts.w2, experts.w3):
        torch.nn.init.normal_(w, std=0.3)
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 8)
    out = experts(x, counts)
    owner = [0, 0, 2, 2, 2]
    for t, e in enumerate(owner):
        h = F.silu(experts.w1[e] @ x[t]) * (experts.w3[e] @ x[t])
        torch.testing.assert_close(out[t], experts.w2[e] @ h)
    padded = experts(torch.cat([x, torch.randn(2, 8)]), counts)  # EP pads the token buffer
    assert torch.equal(padded[:5], out) and padded[5:].abs().max() == 0


# ---------------------------------------------------------------------------- backend switch
def test_backend_resolution():
    assert resolve_backend("torch") == "torch"
    assert resolve_backend("auto") == ("liger" if torch.cuda.is_available() else "torch")
    with pytest.raises(ValueError, match="auto"):
        resolve_backend("triton")


def test_liger_is_not_traced_inside_torch_compile():
    """Blocks are compiled with fullgraph=True: there the PyTorch path is traced instead."""
    from trinity_titan.kernels.backend import use_liger

    def pick(x):
        return x + 1 if use_liger("liger") else x - 1

    x = torch.zeros(2)
    assert torch.equal(pick(x), x + 1)  # eager: Liger (given CUDA tensors)
    compiled = torch.compile(pick, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), x - 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_liger_without_cuda_fails_at_config_time(debug_args):
    from torchtitan.config import ConfigManager

    config = ConfigManager().parse_args(
        [
            "--job.config_file",
            "train_configs/trinity_debug.toml",
            "--kernels.backend",
            "liger",
        ]
    )
    with pytest.raises(ConfigError, match="CUDA"):
        check_job(config, 1, trinity_trainer=True, files=False)
    config.kernels.backend = "auto"
    assert check_job(config, 1, trinity_trainer=True, files=False).model_args.kernel_backend == (
        "torch"
    )


# ---------------------------------------------------------------------------- the model's head
def test_model_with_labels_returns_fused_terms(debug_args):
    """forward(tokens, labels=...) == naive terms on forward(tokens) logits, grads included."""
    fused = FusedLoss(z_loss_coeff=1e-3, chunk_size=100, logit_stats=True)  # 100: crosses chunks
    model = TrinityModel(debug_args)
    model.init_weights(buffer_device=torch.device("cpu"))
    tokens = torch.randint(0, debug_args.vocab_size, (2, 64))
    labels = torch.randint(0, debug_args.vocab_size, (2, 64))
    labels[0, :9] = -100
    logits = model(tokens)
    assert logits.shape == (2, 64, debug_args.vocab_size)
    ref = naive_terms(
        logits.view(-1, logits.shape[-1]), torch.eye(logits.shape[-1]), labels.view(-1), 1e-3
    )
    ref_grads = grads(ref["loss_sum"], *model.parameters())
    terms = model(tokens, labels=labels, fused_loss=fused)
    assert isinstance(terms, LossTerms)
    for name in ("loss_sum", "ce_sum", "z_sum", "logit_max", "logit_sum"):
        torch.testing.assert_close(
            getattr(terms, name).double(), ref[name], rtol=1e-5, atol=1e-4, msg=name
        )
    for (name, _), got, want in zip(
        model.named_parameters(), grads(terms.loss_sum, *model.parameters()), ref_grads, strict=True
    ):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 1e-5, (name, err)


# ---------------------------------------------------------------------------- CUDA: Liger vs torch
@cuda
@pytest.mark.parametrize("shape", [(4, 256, 1024), (2, 128, 8, 128)])  # hidden; QK-norm heads
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_rms_norm_matches_torch(shape, dtype):
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    w = (1 + 0.3 * torch.randn(shape[-1], device="cuda")).to(dtype).requires_grad_()
    g = torch.randn(shape, device="cuda", dtype=dtype)

    def sandwich(backend):
        # x + norm(x): the norm's output gradient is also the residual's (post-norm layout),
        # so an in-place Liger backward would corrupt the residual gradient.
        out = rms_norm(x, w, 1e-5, backend)
        return out, grads(((x + out) * g).sum(), x, w)

    ref, (rx, rw) = sandwich("torch")
    out, (gx, gw) = sandwich("liger")
    tol = dict(rtol=1.6e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(gx, rx, **tol)
    rel = ((gw.float() - rw.float()).norm() / rw.float().norm()).item()
    assert rel < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_silu_mul_matches_torch(dtype):
    gate = torch.randn(512, 768, device="cuda", dtype=dtype, requires_grad=True)
    up = torch.randn(512, 768, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(512, 768, device="cuda", dtype=dtype)
    ref = silu_mul(gate, up, "torch")
    gref = grads((ref * g).sum(), gate, up)
    # Liger's backward writes into its saved inputs: give it copies, as the projections do.
    gate2, up2 = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    out = silu_mul(gate2, up2, "liger")
    tol = dict(rtol=1.6e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(grads((out * g).sum(), gate2, up2), gref, strict=True):
        torch.testing.assert_close(a, b, **tol)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("logit_stats", [True, False])
def test_liger_fused_ce_matches_torch(dtype, logit_stats):
    n, d, v = 2048, 256, 32000
    hidden = torch.randn(n, d, device="cuda").to(dtype).requires_grad_()
    weight = (0.05 * torch.randn(v, d, device="cuda")).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::7] = -100
    kw = dict(z_loss_coeff=1e-4, chunk_size=512)
    ref = fused_linear_cross_entropy(hidden, weight, labels, backend="torch", **kw)
    out = fused_linear_cross_entropy(
        hidden, weight, labels, backend="liger", logit_stats=logit_stats, **kw
    )
    rtol = 1e-3 if dtype == torch.bfloat16 else 1e-5
    names = ["loss_sum", "ce_sum", "z_sum", "logit_sum"] + (["logit_max"] if logit_stats else [])
    for name in names:
        torch.testing.assert_close(
            getattr(out, name).float(), getattr(ref, name), rtol=rtol, atol=1e-2, msg=name
        )
    if not logit_stats:
        assert torch.isnan(out.logit_max)
    assert out.num_valid.item() == ref.num_valid.item()
    gref = grads(ref.loss_sum / 100, hidden, weight)
    gout = grads(out.loss_sum / 100, hidden, weight)
    for a, b in zip(gout, gref, strict=True):
        assert a.dtype == b.dtype == dtype
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 5 * rtol


@cuda
def test_liger_model_matches_torch_model(debug_args):
    """The debug model on CUDA under bf16 autocast (fp32 params, as the bench and single-device
    training run it): Liger norms, SwiGLU and fused loss vs the PyTorch paths."""
    fused = FusedLoss(z_loss_coeff=1e-4, chunk_size=1024, logit_stats=True)
    models = {}
    for backend in ("torch", "liger"):
        args = copy.deepcopy(debug_args)
        args.kernel_backend = backend
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = TrinityModel(args)
        model.init_weights(buffer_device=torch.device("cuda"))
        models[backend] = model
    tokens = torch.randint(0, debug_args.vocab_size, (4, 128), device="cuda")
    labels = torch.randint(0, debug_args.vocab_size, (4, 128), device="cuda")
    terms, g = {}, {}
    for backend, model in models.items():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            terms[backend] = model(tokens, labels=labels, fused_loss=fused)
        g[backend] = grads(terms[backend].loss_sum, *model.parameters())
    torch.testing.assert_close(terms["liger"].loss_sum, terms["torch"].loss_sum, rtol=2e-2, atol=0)
    for (name, _), a, b in zip(
        models["torch"].named_parameters(), g["liger"], g["torch"], strict=True
    ):
        err = ((a.float() - b.float()).norm() / (b.float().norm() + 1e-12)).item()
        assert err < 0.1, (name, err)
