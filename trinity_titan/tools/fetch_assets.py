"""`python -m trinity_titan.tools.fetch_assets FLAVOR`: the Trinity tokenizer and config.json.

    python -m trinity_titan.tools.fetch_assets nano [--repo arcee-ai/Trinity-Nano-Preview]
        [--revision main] [--dest ./assets/trinity_nano] [--cache-dir DIR]

Downloads the tokenizer files, config.json and generation_config.json of a Hugging Face repo
(huggingface_hub's snapshot download, nothing else of the repo) into the folder the flavor's TOML
reads as `[model] hf_assets_path`, then checks them: the tokenizer loads and fits the flavor's
vocabulary, and config.json is compared with the flavor's shape. The files go through the local
HF cache, so with HF_HUB_OFFLINE=1 a cached snapshot is used without network.

Exit status: 0 done, 1 the download failed, 2 the files do not suit the flavor.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import fields
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from trinity_titan.job_config import ConfigError
from trinity_titan.model import TrinityModelArgs, trinity_flavors
from trinity_titan.model.args import hf_shape, read_hf_config
from trinity_titan.model.flavors import FLAVOR_ASSETS
from trinity_titan.model.hf_export import TOKENIZER_FILES

CONFIG_FILES = ("config.json", "generation_config.json")
ALLOW_PATTERNS = [*TOKENIZER_FILES, *CONFIG_FILES]
"""What is downloaded: the tokenizer and the configs, never the weights."""


def fetch(repo: str, dest: Path, revision: str = "main", cache_dir: str | None = None) -> list[str]:
    """Copy the repo's tokenizer and config files into `dest`; return the names copied."""
    snapshot = Path(
        snapshot_download(
            repo, revision=revision, allow_patterns=ALLOW_PATTERNS, cache_dir=cache_dir
        )
    )
    names = [n for n in ALLOW_PATTERNS if (snapshot / n).is_file()]
    if "tokenizer.json" not in names:
        raise ConfigError(
            f"{repo}@{revision} has no tokenizer.json (found: {', '.join(names) or 'nothing'}); "
            "pass --repo with a Trinity repo"
        )
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(snapshot / name, dest / name)  # the cache holds links into its blobs
    return names


def shape_differences(config: dict, flavor: TrinityModelArgs) -> list[str]:
    """'field: config value (flavor value)' for each shape field where `config` and `flavor` differ."""
    shape = hf_shape(config)
    return [
        f"{f.name}: {shape[f.name]} ({getattr(flavor, f.name)})"
        for f in fields(flavor)
        if f.name in shape
        and f.name not in ("max_seq_len", "init_std")
        and shape[f.name] != getattr(flavor, f.name)
    ]


def check(dest: Path, flavor_name: str) -> list[str]:
    """Report lines on the fetched files; ConfigError if the tokenizer does not suit the flavor."""
    flavor = trinity_flavors[flavor_name]
    tokenizer = HuggingFaceTokenizer(str(dest))
    vocab = tokenizer.get_vocab_size()
    if vocab > flavor.vocab_size:
        raise ConfigError(
            f"the tokenizer in {dest} has {vocab} tokens, more than flavor {flavor_name!r}'s "
            f"vocab_size {flavor.vocab_size}: it is not a Trinity tokenizer"
        )
    lines = [
        f"tokenizer: {vocab} tokens (flavor {flavor_name}: vocab_size {flavor.vocab_size}), "
        f"bos id {tokenizer.bos_id}, eos id {tokenizer.eos_id}"
    ]
    config = dest / "config.json"
    if not config.is_file():
        return [*lines, "config.json: not in the repo"]
    try:
        differences = shape_differences(read_hf_config(config, "config.json"), flavor)
    except ConfigError as e:
        return [*lines, f"config.json: not usable as [model] hf_config: {e}"]
    if not differences:
        return [*lines, f"config.json: the shape of flavor {flavor_name}"]
    return [
        *lines,
        f"config.json differs from flavor {flavor_name} in {'; '.join(differences)}: "
        f"to train its shape, set [model] hf_config = {str(config)!r}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trinity_titan.tools.fetch_assets", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("flavor", choices=sorted(FLAVOR_ASSETS))
    parser.add_argument("--repo", help="a Hugging Face repo (default: the flavor's Arcee repo)")
    parser.add_argument("--revision", default="main", help="branch, tag or commit")
    parser.add_argument(
        "--dest", type=Path, help="the folder to fill (default: the flavor's TOML's)"
    )
    parser.add_argument("--cache-dir", help="the HF cache (default: HF_HUB_CACHE)")
    ns = parser.parse_args(argv)
    assets = FLAVOR_ASSETS[ns.flavor]
    repo = ns.repo or assets.repo
    dest = ns.dest or Path(assets.folder)
    try:
        names = fetch(repo, dest, ns.revision, ns.cache_dir)
        report = check(dest, ns.flavor)
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError) as e:
        first = str(e).strip().splitlines()[0]
        print(f"could not download {repo}@{ns.revision}: {first}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(names)} to {dest} (from {repo}@{ns.revision})")
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
