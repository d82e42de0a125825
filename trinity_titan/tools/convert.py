"""Convert checkpoints between the Hugging Face AFMoE layout and TorchTitan's DCP layout.

    python -m trinity_titan.tools.convert hf-to-dcp HF_DIR DCP_DIR [--dtype float32]
    python -m trinity_titan.tools.convert dcp-to-hf DCP_DIR HF_DIR (--hf-config config.json | --flavor NAME)
                                    (--tokenizer DIR | --no-tokenizer) [--dtype bfloat16] [--max-shard-size-gb 5]
    python -m trinity_titan.tools.convert complete-hf HF_DIR (--hf-config config.json | --flavor NAME)
                                    --tokenizer DIR [--dtype float32]

`hf-to-dcp` writes a model-only DCP checkpoint that a run starts from with
`--checkpoint.initial_load_path DCP_DIR`. `dcp-to-hf` reads the model weights of any TorchTitan
checkpoint (e.g. outputs/.../checkpoint/step-1000) and writes a self-contained HF folder: sharded
safetensors, an index, config.json (with the tokenizer's token ids and the model's context),
generation_config.json and the tokenizer files. `complete-hf` adds the same files to a folder of
weights only (TorchTitan's `--checkpoint.last_save_in_hf` under `-m torchtitan.train`; Trinity's
trainer adds them itself). Both conversions hold the whole model in host memory. To start a
large run straight from HF weights without converting, use TorchTitan's own sharded reader:
`--checkpoint.initial_load_path HF_DIR --checkpoint.initial_load_in_hf`.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torchtitan.config import TORCH_DTYPE_MAP

from trinity_titan.job_config import ConfigError
from trinity_titan.model import TrinityModel, TrinityModelArgs, trinity_flavors
from trinity_titan.model.args import read_hf_config
from trinity_titan.model.hf_export import write_hf_metadata
from trinity_titan.model.state_dict_adapter import TrinityStateDictAdapter

INDEX_FILE = "model.safetensors.index.json"
_FP32_BUFFERS = ("expert_bias", "expert_bias_momentum")


def empty_state_dict(args: TrinityModelArgs, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Host tensors with the shapes of the model's persistent state (nothing initialised)."""
    with torch.device("meta"):
        model = TrinityModel(args)
    # The expert bias (and SMEBU's momentum) stays fp32 whatever the weights' dtype (it accumulates tiny updates).
    return {
        k: torch.empty(v.shape, dtype=torch.float32 if k.endswith(_FP32_BUFFERS) else dtype)
        for k, v in model.state_dict().items()
    }


def read_hf(
    hf_dir: Path, dtype: torch.dtype = torch.float32
) -> tuple[TrinityModelArgs, dict[str, torch.Tensor]]:
    """Model args and Trinity state dict from an HF directory (single or sharded safetensors)."""
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: an HF checkpoint directory needs config.json"
        )
    args = TrinityModelArgs.from_hf_config(json.loads(config_path.read_text()))
    state = empty_state_dict(args, dtype)
    adapter = TrinityStateDictAdapter(args, None)
    hf_state = adapter.to_hf(
        state
    )  # views into `state`: loading fills the stacked experts in place
    dcp.load(hf_state, storage_reader=HuggingFaceStorageReader(str(hf_dir)))
    return args, adapter.from_hf(hf_state)


def write_hf(
    state: dict[str, torch.Tensor],
    args: TrinityModelArgs,
    hf_dir: Path,
    tokenizer_dir: Path | None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Write `state` (Trinity keys) as HF safetensors shards + index, and config.json,
    generation_config.json and the tokenizer files of `tokenizer_dir`; returns the shards."""
    hf_state = TrinityStateDictAdapter(args, None).to_hf(state)
    hf_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(hf_state):
        t = hf_state[key]
        if dtype is not None and t.is_floating_point() and not key.endswith("expert_bias"):
            t = t.to(dtype)
        t = t.detach().contiguous().clone()  # safetensors refuses views that share storage
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(hf_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (hf_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    weights_dtype = dtype or next(t.dtype for t in hf_state.values() if t.is_floating_point())
    write_hf_metadata(hf_dir, args, tokenizer_dir, weights_dtype)
    return [hf_dir / n for n in names]


def read_dcp_model(dcp_dir: Path, args: TrinityModelArgs) -> dict[str, torch.Tensor]:
    """The model weights of a TorchTitan DCP checkpoint (optimizer and other states are skipped)."""
    if not (dcp_dir / ".metadata").is_file():
        raise FileNotFoundError(
            f"{dcp_dir} is not a DCP checkpoint (no .metadata); pass a step-N folder"
        )
    state = empty_state_dict(args, torch.float32)
    dcp.load(state, checkpoint_id=str(dcp_dir))
    return state


def hf_to_dcp(hf_dir: Path, dcp_dir: Path, dtype: torch.dtype = torch.float32) -> TrinityModelArgs:
    args, state = read_hf(hf_dir, dtype)
    dcp.save(state, checkpoint_id=str(dcp_dir))
    return args


def dcp_to_hf(
    dcp_dir: Path,
    hf_dir: Path,
    args: TrinityModelArgs,
    tokenizer_dir: Path | None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> list[Path]:
    state = read_dcp_model(dcp_dir, args)
    return write_hf(state, args, hf_dir, tokenizer_dir, max_shard_bytes, dtype)


TOKENIZER_HELP = (
    "the run's tokenizer folder ([model] hf_assets_path): copied, and its ids in config.json"
)


def _shape_arguments(parser: argparse.ArgumentParser) -> None:
    shape = parser.add_mutually_exclusive_group(required=True)
    shape.add_argument("--hf-config", help="an HF config.json describing the model")
    shape.add_argument("--flavor", help="a Trinity flavor name (debugmodel, nano, mini, large)")


def _model_args(ns: argparse.Namespace) -> TrinityModelArgs:
    if ns.hf_config:
        return TrinityModelArgs.from_hf_config(read_hf_config(ns.hf_config, "--hf-config"))
    if ns.flavor not in trinity_flavors:
        raise SystemExit(f"unknown --flavor {ns.flavor!r}; choose one of {sorted(trinity_flavors)}")
    return trinity_flavors[ns.flavor]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trinity_titan.tools.convert", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    to_dcp = sub.add_parser(
        "hf-to-dcp", help="HF safetensors directory -> model-only DCP checkpoint"
    )
    to_dcp.add_argument("hf_dir", type=Path)
    to_dcp.add_argument("dcp_dir", type=Path)
    to_dcp.add_argument("--dtype", default="float32", choices=sorted(TORCH_DTYPE_MAP))
    to_hf = sub.add_parser(
        "dcp-to-hf", help="TorchTitan DCP checkpoint -> HF safetensors directory"
    )
    to_hf.add_argument("dcp_dir", type=Path)
    to_hf.add_argument("hf_dir", type=Path)
    _shape_arguments(to_hf)
    tokenizer = to_hf.add_mutually_exclusive_group(required=True)
    tokenizer.add_argument("--tokenizer", type=Path, help=TOKENIZER_HELP)
    tokenizer.add_argument(
        "--no-tokenizer",
        action="store_true",
        help="weights and config.json only (AutoTokenizer cannot load the folder)",
    )
    to_hf.add_argument(
        "--dtype",
        default=None,
        choices=sorted(TORCH_DTYPE_MAP),
        help="cast weights (default: keep)",
    )
    to_hf.add_argument("--max-shard-size-gb", type=float, default=5.0)
    complete = sub.add_parser(
        "complete-hf",
        help="add config.json, generation_config.json and the tokenizer to a folder of HF weights",
    )
    complete.add_argument("hf_dir", type=Path)
    _shape_arguments(complete)
    complete.add_argument("--tokenizer", type=Path, required=True, help=TOKENIZER_HELP)
    complete.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(TORCH_DTYPE_MAP),
        help="the weights' dtype ([checkpoint] export_dtype; default float32)",
    )
    ns = parser.parse_args(argv)
    # DCP announces that it runs in a single process: that is the intent here.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")

    try:
        if ns.command == "complete-hf":
            written = write_hf_metadata(
                ns.hf_dir, _model_args(ns), ns.tokenizer, TORCH_DTYPE_MAP[ns.dtype]
            )
            print(f"wrote {', '.join(written)} to {ns.hf_dir}")
        elif ns.command == "hf-to-dcp":
            args = hf_to_dcp(ns.hf_dir, ns.dcp_dir, TORCH_DTYPE_MAP[ns.dtype])
            print(
                f"wrote DCP checkpoint {ns.dcp_dir} ({args.n_layers} layers, {args.num_experts} experts)"
            )
        else:
            dtype = TORCH_DTYPE_MAP[ns.dtype] if ns.dtype else None
            tokenizer = None if ns.no_tokenizer else ns.tokenizer
            shards = dcp_to_hf(
                ns.dcp_dir,
                ns.hf_dir,
                _model_args(ns),
                tokenizer,
                dtype,
                int(ns.max_shard_size_gb * 2**30),
            )
            extra = "generation_config.json and the tokenizer" if tokenizer else "no tokenizer"
            print(
                f"wrote {len(shards)} safetensors shard(s), {INDEX_FILE}, config.json, {extra} "
                f"to {ns.hf_dir}"
            )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
