"""What makes an HF checkpoint folder self-contained besides its weights.

`convert dcp-to-hf` and TorchTitan's `--checkpoint.last_save_in_hf` write safetensors and an
index; transformers' `AutoModelForCausalLM` also needs config.json, and `AutoTokenizer` the
tokenizer files. `write_hf_metadata` adds them: config.json from the model args with the
tokenizer's bos/eos/pad ids, the model's context length and the weights' dtype,
generation_config.json with the same ids, and a copy of the run's tokenizer files.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from trinity_titan.job_config import ConfigError
from trinity_titan.model.args import TrinityModelArgs

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
"""The files of an HF tokenizer folder that are copied when present."""


@dataclass(frozen=True)
class TokenIds:
    """The special token ids an HF config names."""

    bos: int | None
    eos: int | None
    pad: int | None
    vocab_size: int

    @classmethod
    def from_folder(cls, folder: Path) -> TokenIds:
        """The ids of the tokenizer in `folder` (tokenizer.json and tokenizer_config.json)."""
        if not (folder / "tokenizer.json").is_file():
            raise ConfigError(
                f"{folder} holds no tokenizer.json. Fix: pass the run's tokenizer folder "
                "([model] hf_assets_path; python -m trinity_titan.tools.fetch_assets fetches one)."
            )
        tokenizer = HuggingFaceTokenizer(str(folder))
        pad = None
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():
            pad_token = json.loads(config_file.read_text()).get("pad_token")
            if isinstance(pad_token, dict):
                pad_token = pad_token.get("content")
            if pad_token:
                pad = tokenizer.token_to_id(pad_token)
        return cls(tokenizer.bos_id, tokenizer.eos_id, pad, tokenizer.get_vocab_size())


def hf_config_dict(args: TrinityModelArgs, ids: TokenIds | None, dtype: torch.dtype) -> dict:
    """config.json: the model's shape and context, the weights' dtype, the tokenizer's ids."""
    config: dict[str, Any] = args.to_hf_config()
    config["dtype"] = str(dtype).removeprefix("torch.")
    if ids is not None:
        config.update(bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad)
    return config


def write_hf_metadata(
    folder: Path, args: TrinityModelArgs, tokenizer_dir: Path | None, dtype: torch.dtype
) -> list[str]:
    """Write config.json, generation_config.json and the tokenizer files into `folder` (which
    holds the weights); return the names written. No tokenizer: config.json only."""
    ids = None
    written = ["config.json"]
    if tokenizer_dir is not None:
        ids = TokenIds.from_folder(tokenizer_dir)
        if ids.vocab_size > args.vocab_size:
            raise ConfigError(
                f"the tokenizer in {tokenizer_dir} has {ids.vocab_size} tokens, more than the "
                f"model's vocab_size {args.vocab_size}: it is not this model's tokenizer"
            )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps(hf_config_dict(args, ids, dtype), indent=2) + "\n"
    )
    if ids is None:
        return written
    generation = {
        k: v
        for k, v in (
            ("bos_token_id", ids.bos),
            ("eos_token_id", ids.eos),
            ("pad_token_id", ids.pad),
        )
        if v is not None
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    written.append("generation_config.json")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, folder / name)
            written.append(name)
    return written
