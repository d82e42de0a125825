"""Build the offline debug assets: a small text corpus and a byte-level BPE tokenizer.

The debug training config (`train_configs/trinity_debug.toml`) must train on a fresh machine with
no network, so its data and tokenizer ship inside the package under `trinity_titan/assets/debug`.
The text comes from the English prose every CPython install already has: the docstrings of the
Python standard library plus pydoc's help-topic pages (PSF license). Everything here is
deterministic, so rerunning the script with the same Python and `tokenizers` versions reproduces
the committed files byte for byte.

Usage (from the repository root):

    python scripts/make_debug_assets.py
    python scripts/make_debug_assets.py --max-bytes 2000000 --vocab-size 2048 --out-dir DIR
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "trinity_titan" / "assets" / "debug"

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"

# Stdlib directories that are test suites, GUI demos, vendored wheels or deprecated tooling: they
# add noise (or no docstrings at all) rather than prose.
SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "__pycache__",
    }
)
MIN_DOC_CHARS = 200
SHUFFLE_SEED = 0
VALIDATION_EVERY = 20  # every 20th document (5%) is held out, spread over the whole corpus

_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


def stdlib_files(stdlib: Path) -> list[Path]:
    """The stdlib's `.py` files outside SKIP_DIRS, sorted by relative path so the order is stable."""
    files = [
        path
        for path in stdlib.rglob("*.py")
        if not SKIP_DIRS.intersection(path.relative_to(stdlib).parts[:-1])
    ]
    return sorted(files, key=lambda p: p.relative_to(stdlib).as_posix())


def normalise(text: str) -> str:
    """Light cleanup: tabs to spaces, no trailing spaces, at most one blank line in a row."""
    text = text.expandtabs(4).replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING_SPACE.sub("\n", text)
    return _BLANK_RUNS.sub("\n\n", text).strip()


def docstrings(path: Path) -> Iterator[str]:
    """Module, class and function docstrings of one file, in source order; nothing if unparsable."""
    try:
        with warnings.catch_warnings():  # e.g. SyntaxWarning for odd escapes in old modules
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=path.name)
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return
    nodes = [node for node in ast.walk(tree) if isinstance(node, _DOC_NODES)]
    nodes.sort(key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield normalise(doc)


def pydoc_topics(stdlib: Path) -> Iterator[str]:
    """The `help("topics")` pages in `pydoc_data/topics.py`, sorted by name.

    They are the Python language reference rendered as plain text: the largest block of prose in
    the stdlib, and it roughly doubles the token count the docstrings alone give.
    """
    try:
        tree = ast.parse((stdlib / "pydoc_data" / "topics.py").read_bytes())
    except (OSError, SyntaxError, ValueError):
        return
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "topics" for t in node.targets
        ):
            topics: dict[str, str] = ast.literal_eval(node.value)
            for name in sorted(topics):
                yield normalise(topics[name])


def source_texts(stdlib: Path) -> Iterator[str]:
    """Every candidate document: docstrings in file order first, then the pydoc topic pages."""
    for path in stdlib_files(stdlib):
        yield from docstrings(path)
    yield from pydoc_topics(stdlib)


def collect_documents(stdlib: Path, max_bytes: int) -> list[str]:
    """Deduplicated texts of at least MIN_DOC_CHARS, in source order, up to max_bytes of UTF-8."""
    seen: set[str] = set()
    documents: list[str] = []
    total = 0
    for doc in source_texts(stdlib):
        if len(doc) < MIN_DOC_CHARS or doc in seen:
            continue
        size = len(doc.encode("utf-8"))
        if total + size > max_bytes:
            break
        seen.add(doc)
        documents.append(doc)
        total += size
    return documents


def split_documents(documents: list[str]) -> tuple[list[str], list[str]]:
    """Hold out every VALIDATION_EVERY-th document; the two sets are disjoint by construction."""
    train = [d for i, d in enumerate(documents) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
    validation = [
        d for i, d in enumerate(documents) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1
    ]
    return train, validation


def write_jsonl(path: Path, documents: list[str]) -> None:
    """One `{"text": ...}` object per line, UTF-8, `\\n` line endings on every platform."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")


def train_tokenizer(documents: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): every byte is in the base alphabet, so nothing is ever <unk>.

    BOS/EOS are ids 0 and 1. No post-processor adds them: TorchTitan's HuggingFaceTokenizer adds
    them itself when asked (`encode(text, add_bos=True, add_eos=True)`), exactly once each.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return tokenizer


def tokenizer_config() -> dict[str, object]:
    """What HuggingFaceTokenizer (and transformers' PreTrainedTokenizerFast) read next to tokenizer.json."""
    special = {
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            "0": {"content": BOS_TOKEN, **special},
            "1": {"content": EOS_TOKEN, **special},
        },
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_json(path: Path, obj: object) -> None:
    """Pretty, key-sorted JSON with a trailing newline, so the file diffs cleanly."""
    path.write_text(
        json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where the assets go")
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=2_000_000,
        help="cap on text, train + validation (UTF-8 bytes)",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=2048, help="BPE vocabulary size, specials included"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    # Pin BPE training to one thread so the merges cannot depend on thread scheduling (multi-threaded
    # runs were identical too with tokenizers 0.23, but that is not promised). Rayon reads this
    # when it first builds its thread pool, i.e. at the first parallel call, not at import.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    args = parse_args(argv)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = collect_documents(stdlib, args.max_bytes)
    train, validation = split_documents(documents)
    # Source order groups similar modules together; a fixed shuffle gives a debug run a smooth,
    # representative loss curve instead of jumps at topic boundaries.
    random.Random(SHUFFLE_SEED).shuffle(train)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "corpus.jsonl", train)
    write_jsonl(args.out_dir / "validation.jsonl", validation)

    tokenizer = train_tokenizer(train, args.vocab_size)
    tokenizer.save(str(args.out_dir / "tokenizer.json"), pretty=True)
    write_json(args.out_dir / "tokenizer_config.json", tokenizer_config())

    train_tokens = sum(len(e.ids) for e in tokenizer.encode_batch(train))
    val_tokens = sum(len(e.ids) for e in tokenizer.encode_batch(validation))
    version = ".".join(map(str, sys.version_info[:3]))
    print(f"Python {version} stdlib docstrings + pydoc topics -> {args.out_dir}")
    print(f"  corpus.jsonl:     {len(train)} documents, {train_tokens} tokens")
    print(f"  validation.jsonl: {len(validation)} documents, {val_tokens} tokens")
    print(f"  tokenizer.json:   vocab size {tokenizer.get_vocab_size()}")


if __name__ == "__main__":
    main()
