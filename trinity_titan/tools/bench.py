"""`python -m trinity_titan.tools.bench`: single-device training throughput, MFU, peak memory and loss.

Builds the Trinity model of a TOML config once per kernel backend (and, with --compare-deepseek,
TorchTitan's own DeepSeek-V3 at a matched size) in one process, trains each for --steps AdamW
steps on the same batches, and prints one JSON document:

    python -m trinity_titan.tools.bench --config train_configs/trinity_debug.toml --steps 20 \\
        --backends torch,liger --compare-deepseek
    python -m trinity_titan.tools.bench --config train_configs/trinity_nano.toml --proxy nano \\
        --data random --backends torch,liger --compare-deepseek   # one GPU

Throughput excludes the --warmup steps. MFU = tokens/s x training FLOPs per token (each model's
`get_nparams_and_flops`) / the device's peak bf16 FLOPs (TorchTitan's table); it is null on CPU,
as is peak memory (the process RSS cannot be reset between runs). Parameters stay fp32; with
`training.mixed_precision_param = "bfloat16"` the steps run under bf16 autocast, as TorchTitan
does on a single device. `compile.enable` and `activation_checkpoint.mode` are applied with
TorchTitan's helpers, as in training (pass them as overrides: `--compile.enable`).

`--attention 4096,8192` times the attention op instead (SDPA vs FlexAttention, forward +
backward, a local and a global layer of the model's heads and window), in the config's
mixed-precision dtype:

    python -m trinity_titan.tools.bench --config train_configs/trinity_nano.toml --proxy nano \
        --attention 4096,8192 --batch-size 1
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from datetime import UTC, datetime
from typing import Any

import torch
from torch import nn
from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_loss
from torchtitan.config import TORCH_DTYPE_MAP, ConfigManager, JobConfig
from torchtitan.models.deepseek_v3 import DeepSeekV3Model, DeepSeekV3ModelArgs
from torchtitan.models.moe import MoEArgs
from torchtitan.tools.utils import get_peak_flops

import trinity_titan  # noqa: F401  (registers the trinity spec, CPU support)
from trinity_titan.compat.cpu import cpu_int_histc
from trinity_titan.kernels import resolve_backend
from trinity_titan.model import TrinityModel, TrinityModelArgs, trinity_flavors
from trinity_titan.model.attention import (
    FlexAttention,
    ScaledDotProductAttention,
    build_flex_masks,
    build_sdpa_masks,
)
from trinity_titan.model.lm_head import FusedLoss
from trinity_titan.parallel.parallelize import apply_ac_and_compile

Batch = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------- models
def nano_proxy(n_layers: int) -> TrinityModelArgs:
    """Trinity Nano's shapes (dim 1024, 128 experts top-8, vocab 200192) with fewer layers, so
    that one GPU holds it with fp32 AdamW state."""
    args = copy.deepcopy(trinity_flavors["nano"])
    args.n_layers = n_layers
    args.n_dense_layers = min(args.n_dense_layers, n_layers)
    return args


def matched_deepseek(t: TrinityModelArgs) -> DeepSeekV3ModelArgs:
    """TorchTitan's DeepSeek-V3 with Trinity's width, depth, FFN sizes, experts and routing.

    Attention is DeepSeek's MLA (no LoRA on q; q/k head = head_dim/2 nope + head_dim/2 rope,
    v head = head_dim, kv rank 4 x head_dim), full causal on every layer, no YaRN scaling.
    """
    return DeepSeekV3ModelArgs(
        vocab_size=t.vocab_size,
        dim=t.dim,
        inter_dim=t.ffn_hidden_dim,
        moe_inter_dim=t.moe_hidden_dim,
        n_layers=t.n_layers,
        n_dense_layers=t.n_dense_layers,
        n_heads=t.n_heads,
        norm_eps=t.norm_eps,
        moe_args=MoEArgs(
            num_experts=t.num_experts,
            num_shared_experts=t.num_shared_experts,
            top_k=t.top_k,
            score_func="sigmoid",
            route_norm=True,
            route_scale=t.route_scale,
            score_before_experts=False,
            use_grouped_mm=t.use_grouped_mm,
            load_balance_coeff=None,
        ),
        q_lora_rank=0,
        kv_lora_rank=4 * t.head_dim,
        qk_nope_head_dim=t.head_dim // 2,
        qk_rope_head_dim=t.head_dim // 2,
        v_head_dim=t.head_dim,
        max_seq_len=t.max_seq_len,
        original_seq_len=t.max_seq_len,
        rope_theta=t.rope_theta,
        attn_type="sdpa",
    )


def build(model_cls: type[nn.Module], args: Any, job_config: JobConfig, device: torch.device):
    """Meta init, materialise on the device, initialise, then TorchTitan's AC and compile."""
    torch.manual_seed(job_config.debug.seed)
    with torch.device("meta"):
        model = model_cls(args)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    apply_ac_and_compile(model, job_config)
    return model.train()


# ---------------------------------------------------------------------------- data
def batches(job_config: JobConfig, data: str, vocab: int, device: torch.device) -> Iterator[Batch]:
    """The config's own dataloader ("corpus"), or seeded uniform tokens ("random")."""
    if data == "random":
        gen = torch.Generator().manual_seed(job_config.debug.seed)
        shape = (job_config.training.local_batch_size, job_config.training.seq_len + 1)
        while True:
            seq = torch.randint(0, vocab, shape, generator=gen)
            yield seq[:, :-1].to(device), seq[:, 1:].to(device)
    from torchtitan.components.tokenizer import build_hf_tokenizer

    from trinity_titan.data.debug_loader import build_debug_dataloader

    loader = build_debug_dataloader(
        dp_world_size=1, dp_rank=0, tokenizer=build_hf_tokenizer(job_config), job_config=job_config
    )
    for input_dict, labels in loader:
        yield input_dict["input"].to(device), labels.to(device)


# ---------------------------------------------------------------------------- one run
def train_steps(
    model: nn.Module,
    loss_terms: Callable[
        [nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
    ],
    data: Iterator[Batch],
    job_config: JobConfig,
    steps: int,
    warmup: int,
    device: torch.device,
) -> dict[str, Any]:
    """AdamW steps; returns per-step CE losses and the time of the steps after warmup."""
    opt = job_config.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=opt.lr, eps=opt.eps, weight_decay=opt.weight_decay
    )
    mp = job_config.training.mixed_precision_param
    amp = (
        torch.autocast(device.type, dtype=TORCH_DTYPE_MAP[mp]) if mp != "float32" else nullcontext()
    )
    losses: list[float] = []
    start = None
    for step in range(steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        inputs, labels = next(data)
        optimizer.zero_grad(set_to_none=True)
        with amp:
            loss_sum, ce_sum = loss_terms(model, inputs, labels)
        n_valid = (labels != IGNORE_INDEX).sum().clamp(min=1)
        (loss_sum / n_valid).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), job_config.training.max_norm)
        optimizer.step()
        losses.append((ce_sum.detach() / n_valid).item())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"losses": losses, "timed_s": time.perf_counter() - start}


def trinity_loss(fused: FusedLoss | None):
    def terms(model, inputs, labels):
        if fused is not None:
            t = model(inputs, labels=labels, fused_loss=fused)
            return t.loss_sum, t.ce_sum
        ce = cross_entropy_loss(model(inputs), labels)
        return ce, ce

    return terms


def logits_loss(model, inputs, labels):
    ce = cross_entropy_loss(model(inputs), labels)
    return ce, ce


def run_case(
    name: str,
    backend: str,
    make: Callable[[], tuple[nn.Module, Any]],
    loss_terms,
    job_config: JobConfig,
    data_kind: str,
    steps: int,
    warmup: int,
    device: torch.device,
    peak_flops: float | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    result: dict[str, Any] = {"model": name, "backend": backend, **extra}
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, args = make()
    seq_len = job_config.training.seq_len
    nparams, flops_per_token = args.get_nparams_and_flops(model, seq_len)
    data = batches(job_config, data_kind, args.vocab_size, device)
    out = train_steps(model, loss_terms, data, job_config, steps, warmup, device)
    tokens = (steps - warmup) * job_config.training.local_batch_size * seq_len
    tps = tokens / out["timed_s"]
    result.update(
        params=nparams,
        flops_per_token=flops_per_token,
        tokens_per_s=round(tps, 2),
        mfu=round(tps * flops_per_token / peak_flops, 5) if peak_flops else None,
        peak_memory_gib=(
            round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None
        ),
        first_loss=round(out["losses"][0], 5),
        final_loss=round(out["losses"][-1], 5),
    )
    del model, data
    return result


# ---------------------------------------------------------------------------- attention op
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_attention(
    args: TrinityModelArgs,
    seq_len: int,
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
    repeats: int,
) -> dict[str, Any]:
    """Forward + backward of the attention op alone, SDPA vs FlexAttention, on a local
    (sliding-window) and a global (causal) layer: the model's kernels and mask builders.

    Each figure is the median of `repeats` timed calls after two untimed ones (FlexAttention
    compiles on the first). `max_rel_diff` = max |flex - sdpa| / max |sdpa| of the outputs.
    """
    gen = torch.Generator().manual_seed(0)

    def tensor(heads: int) -> torch.Tensor:
        t = torch.randn(batch, heads, seq_len, args.head_dim, generator=gen)
        return t.to(device=device, dtype=dtype).requires_grad_()

    q, k, v = tensor(args.n_heads), tensor(args.n_kv_heads), tensor(args.n_kv_heads)
    grad = torch.randn(q.shape, generator=gen).to(device=device, dtype=dtype) / 3
    scale = args.head_dim**-0.5
    tokens = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    sdpa_masks = build_sdpa_masks(seq_len, args.sliding_window, device)
    flex_masks = build_flex_masks(tokens, args.sliding_window)
    kernels = {
        "sdpa": (ScaledDotProductAttention(), sdpa_masks),
        "flex": (FlexAttention(), flex_masks),
    }
    result: dict[str, Any] = {"seq_len": seq_len, "batch": batch}
    for layer in ("local", "global"):
        outputs: dict[str, torch.Tensor] = {}
        for name, (kernel, masks) in kernels.items():
            mask = masks.local if layer == "local" else masks.global_

            def call(kernel=kernel, mask=mask) -> torch.Tensor:
                q.grad = k.grad = v.grad = None
                out = kernel(q, k, v, mask, scale)
                out.backward(grad)
                return out.detach()

            try:
                times = []
                for i in range(repeats + 2):
                    _sync(device)
                    start = time.perf_counter()
                    outputs[name] = call()
                    _sync(device)
                    if i >= 2:
                        times.append(time.perf_counter() - start)
                result[f"{layer}_{name}_ms"] = round(1e3 * statistics.median(times), 3)
            except NotImplementedError as e:  # FlexAttention has no backward on CPU
                result[f"{layer}_{name}_skipped"] = f"{type(e).__name__}: {e}"
        if len(outputs) == 2:
            sdpa, flex = outputs["sdpa"].float(), outputs["flex"].float()
            diff = (flex - sdpa).abs().max() / sdpa.abs().max()
            result[f"{layer}_max_rel_diff"] = float(f"{diff.item():.3g}")
            result[f"{layer}_flex_speedup"] = round(
                result[f"{layer}_sdpa_ms"] / result[f"{layer}_flex_ms"], 3
            )
    return result


# ---------------------------------------------------------------------------- entry point
def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m trinity_titan.tools.bench",
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after the options are TorchTitan overrides, e.g. --model.attn_type flex.",
    )
    p.add_argument("--config", required=True, help="TOML, e.g. train_configs/trinity_debug.toml")
    p.add_argument("--steps", type=int, default=20, help="training steps per model")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed first steps (default steps//4)"
    )
    p.add_argument("--backends", default="torch,liger", help="comma list of torch, liger, auto")
    p.add_argument(
        "--fused-loss",
        choices=("on", "off"),
        default="on",
        help="Trinity's head: fused linear cross-entropy (on) or materialised logits (off)",
    )
    p.add_argument(
        "--compare-deepseek", action="store_true", help="also run TorchTitan's DeepSeek-V3"
    )
    p.add_argument("--proxy", choices=("nano",), default=None, help="nano shapes, fewer layers")
    p.add_argument("--proxy-layers", type=int, default=8, help="layers of the --proxy model")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    p.add_argument("--data", choices=("corpus", "random"), default="corpus")
    p.add_argument(
        "--attention",
        default=None,
        metavar="SEQ,SEQ",
        help="instead of training: time the attention op (SDPA vs FlexAttention, forward + "
        "backward) at these sequence lengths, with the model's heads and window",
    )
    p.add_argument("--attention-repeats", type=int, default=5)
    return p.parse_known_args(argv)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    opts, overrides = parse_args(argv)
    job_config = ConfigManager().parse_args(["--job.config_file", opts.config, *overrides])
    training = job_config.training
    if opts.proxy == "nano":
        training.seq_len, training.local_batch_size = 4096, 2
    if opts.seq_len:
        training.seq_len = opts.seq_len
    if opts.batch_size:
        training.local_batch_size = opts.batch_size
    warmup = opts.steps // 4 if opts.warmup is None else opts.warmup
    if not 0 <= warmup < opts.steps:
        raise SystemExit("--warmup must be in [0, --steps)")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name()
        peak_flops = get_peak_flops(device_name)
    else:
        device_name, peak_flops = f"CPU ({platform.processor() or platform.machine()})", None

    base = (
        nano_proxy(opts.proxy_layers)
        if opts.proxy
        else copy.deepcopy(trinity_flavors[job_config.model.flavor])
    )
    base.update_from_config(job_config)  # seq_len, attention, MoE overrides
    kernels = job_config.kernels
    fused = FusedLoss(
        job_config.loss.z_loss_coeff, kernels.loss_chunk_size, kernels.fused_logit_stats
    )
    common = dict(
        job_config=job_config,
        data_kind=opts.data,
        steps=opts.steps,
        warmup=warmup,
        device=device,
        peak_flops=peak_flops,
    )
    header = {
        "config": opts.config,
        "proxy": opts.proxy,
        "model_shape": {
            "dim": base.dim,
            "n_layers": base.n_layers,
            "vocab_size": base.vocab_size,
            "experts": f"{base.num_experts} top-{base.top_k} + {base.num_shared_experts} shared",
        },
        "device": device_name,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "dtype": training.mixed_precision_param,
    }
    if opts.attention:
        report = {
            **header,
            "heads": f"{base.n_heads} q / {base.n_kv_heads} kv x {base.head_dim}",
            "sliding_window": base.sliding_window,
            "repeats": opts.attention_repeats,
            "attention": [
                time_attention(
                    base,
                    int(seq),
                    training.local_batch_size,
                    TORCH_DTYPE_MAP[training.mixed_precision_param],
                    device,
                    opts.attention_repeats,
                )
                for seq in opts.attention.split(",")
            ],
        }
        print(json.dumps(report, indent=2))
        return report
    runs = []
    for requested in [b.strip() for b in opts.backends.split(",") if b.strip()]:
        try:
            backend = resolve_backend(requested)
        except ValueError as e:
            runs.append({"model": "trinity", "backend": requested, "skipped": str(e)})
            continue
        args = copy.deepcopy(base)
        args.kernel_backend = backend
        runs.append(
            run_case(
                "trinity",
                backend,
                lambda args=args: (build(TrinityModel, args, job_config, device), args),
                trinity_loss(fused if opts.fused_loss == "on" else None),
                extra={"fused_loss": opts.fused_loss == "on"},
                **common,
            )
        )
    if opts.compare_deepseek:
        ds = matched_deepseek(base)
        ds.update_from_config(job_config)
        with cpu_int_histc() if device.type == "cpu" else nullcontext():
            runs.append(
                run_case(
                    "deepseek_v3",
                    "torchtitan",
                    lambda: (build(DeepSeekV3Model, ds, job_config, device), ds),
                    logits_loss,
                    extra={"fused_loss": False},
                    **common,
                )
            )
    report = {
        **header,
        "compile": job_config.compile.enable and "model" in job_config.compile.components,
        "attn_type": base.attn_type,
        "grouped_mm": base.use_grouped_mm,
        "data": opts.data,
        "batch_size": training.local_batch_size,
        "seq_len": training.seq_len,
        "steps": opts.steps,
        "warmup_steps": warmup,
        "peak_flops": peak_flops,
        "runs": runs,
    }
    print(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (`python -m trinity_titan.tools.bench`, `trinity-bench`)."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
