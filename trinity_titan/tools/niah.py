"""Multi-key needle-in-a-haystack (MK-NIAH, after RULER) for long-context checks of a checkpoint.

Each sample hides `--num-keys` needles "One of the special magic numbers for <key> is: <value>."
at random depths of a filler haystack of the target length, then asks for one key's value; the
model answers greedily and a sample counts as correct when the value appears in the answer.

    python -m trinity_titan.tools.niah --checkpoint outputs/run/checkpoint/step-1000 --flavor nano \
        --tokenizer ./assets/trinity_nano --lengths 4096,16384,65536
    python -m trinity_titan.tools.niah --checkpoint HF_DIR --tokenizer HF_DIR --lengths 8192

A checkpoint directory with a config.json is read as HF safetensors; otherwise as a TorchTitan DCP
checkpoint, whose shape comes from --flavor or --hf-config. Decoding recomputes the full context
per token (no KV cache): use a GPU for long contexts.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from trinity_titan.model import TrinityModel, TrinityModelArgs, trinity_flavors
from trinity_titan.tools.convert import read_dcp_model, read_hf

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
NEEDLE = "One of the special magic numbers for {key} is: {value}. "
QUESTION = "What is the special magic number for {key} mentioned in the provided text? The special magic number for {key} mentioned in the provided text is"
KEYS = (
    "amber-falcon", "quiet-harbor", "silver-meadow", "broken-compass", "hollow-pine", "crimson-tide",
    "velvet-storm", "lucky-anchor", "frozen-lantern", "gentle-river", "iron-orchid", "paper-moon",
)  # fmt: skip


@dataclass
class Sample:
    prompt_ids: list[int]
    key: str
    value: str


def make_sample(
    tokenizer: HuggingFaceTokenizer, length: int, num_keys: int, rng: random.Random
) -> Sample:
    """A prompt of `length` tokens (to within one filler sentence) and its expected answer.

    Pieces are tokenized separately and their ids concatenated, so the length is exact in tokens.
    """
    if not 1 <= num_keys <= len(KEYS):
        raise ValueError(f"--num-keys must be in [1, {len(KEYS)}], got {num_keys}")
    keys = rng.sample(KEYS, num_keys)
    values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in keys]
    target = rng.randrange(num_keys)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_bos=False, add_eos=False)

    filler = encode(FILLER)
    needles = [encode(NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values, strict=True)]
    question = encode(QUESTION.format(key=keys[target]))
    fixed = 1 + len(question) + sum(map(len, needles))  # + BOS
    if length < fixed + len(filler):
        raise ValueError(
            f"length {length} is too short for {num_keys} needles: use at least {fixed + len(filler)}"
        )
    chunks = [filler] * ((length - fixed) // len(filler))
    for needle in needles:
        chunks.insert(rng.randrange(len(chunks) + 1), needle)
    ids = [tokenizer.bos_id] + [t for chunk in chunks for t in chunk] + question
    return Sample(ids, keys[target], values[target])


@torch.no_grad()
def greedy_answer(
    model: TrinityModel, prompt_ids: list[int], max_new_tokens: int, device: torch.device
) -> list[int]:
    tokens = torch.tensor([prompt_ids], device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        next_id = int(model(tokens)[0, -1].argmax())
        out.append(next_id)
        tokens = torch.cat([tokens, tokens.new_tensor([[next_id]])], dim=1)
    return out


def is_correct(answer: str, value: str) -> bool:
    return value in answer


def evaluate(
    model: TrinityModel,
    tokenizer: HuggingFaceTokenizer,
    lengths: list[int],
    num_samples: int,
    num_keys: int,
    seed: int = 0,
    device: torch.device | None = None,
) -> dict[int, float]:
    """Accuracy per context length."""
    device = device or torch.device("cpu")
    model.eval()
    results = {}
    for length in lengths:
        rng = random.Random(f"{seed}-{length}")
        correct = 0
        for _ in range(num_samples):
            sample = make_sample(tokenizer, length, num_keys, rng)
            budget = len(tokenizer.encode(" " + sample.value, add_bos=False, add_eos=False)) + 4
            answer = tokenizer.decode(greedy_answer(model, sample.prompt_ids, budget, device))
            correct += is_correct(answer, sample.value)
        results[length] = correct / num_samples
    return results


def load_model(
    checkpoint: Path, args: TrinityModelArgs | None, max_seq_len: int, device: torch.device
) -> TrinityModel:
    """A Trinity model with the checkpoint's weights and a RoPE table long enough for `max_seq_len`."""
    if (checkpoint / "config.json").is_file():
        args, state = read_hf(checkpoint)
    elif args is None:
        raise ValueError("a DCP checkpoint needs --flavor or --hf-config to know the model's shape")
    else:
        state = read_dcp_model(checkpoint, args)
    args = copy.deepcopy(args)
    args.max_seq_len = max(args.max_seq_len, max_seq_len)
    args.use_grouped_mm = False
    with torch.device(device):
        model = TrinityModel(args)
    model.load_state_dict(state, strict=False)
    return model


def run(argv: list[str] | None = None) -> dict[int, float]:
    parser = argparse.ArgumentParser(
        prog="python -m trinity_titan.tools.niah", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="DCP step-N folder or HF directory"
    )
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument(
        "--flavor", choices=sorted(trinity_flavors), help="model shape of a DCP checkpoint"
    )
    shape.add_argument(
        "--hf-config", type=Path, help="HF config.json giving the shape of a DCP checkpoint"
    )
    parser.add_argument(
        "--tokenizer", type=Path, required=True, help="directory with tokenizer.json"
    )
    parser.add_argument(
        "--lengths", required=True, help="comma-separated context lengths in tokens"
    )
    parser.add_argument("--num-samples", type=int, default=20)
    parser.add_argument(
        "--num-keys", type=int, default=4, help="needles per sample (one is asked for)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    ns = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")

    lengths = [int(x) for x in ns.lengths.split(",") if x.strip()]
    if not lengths or min(lengths) < 16:
        raise SystemExit(f"--lengths must list context lengths >= 16 tokens, got {ns.lengths!r}")
    if ns.hf_config:
        args = TrinityModelArgs.from_hf_config(json.loads(ns.hf_config.read_text()))
    else:
        args = trinity_flavors[ns.flavor] if ns.flavor else None
    tokenizer = HuggingFaceTokenizer(str(ns.tokenizer))
    device = torch.device(ns.device)
    model = load_model(ns.checkpoint, args, max(lengths) + 64, device)
    results = evaluate(model, tokenizer, lengths, ns.num_samples, ns.num_keys, ns.seed, device)
    if ns.json:
        print(json.dumps({str(k): v for k, v in results.items()}))
    else:
        print(f"MK-NIAH ({ns.num_keys} keys, {ns.num_samples} samples per length)")
        print(f"{'length':>8}  accuracy")
        for length, acc in results.items():
            print(f"{length:>8}  {acc:.3f}")
    return results


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (`python -m trinity_titan.tools.niah`, `trinity-niah`)."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
