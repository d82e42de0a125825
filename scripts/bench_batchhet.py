"""BatchHet of the debug model trained on RSDB vs sequential packing (CPU, a few minutes).

The corpus is the debug corpus plus a few very long documents (a counting sequence, easy to
predict, and random letters, impossible to predict). Each run trains with 2 data-parallel ranks
and one micro-batch per rank, so BatchHet of a step = global max loss - global mean loss (both
logged by TorchTitan to TensorBoard). Prints the mean over steps after the first `--skip`.

    python scripts/bench_batchhet.py --steps 60 --out /tmp/batchhet
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.distributed.launch import DEBUG_TOML, run_train  # noqa: E402


def make_corpus(path: Path, n_long: int = 6, long_words: int = 12_000) -> None:
    docs = [json.loads(line) for line in (REPO / "trinity_titan/assets/debug/corpus.jsonl").open()]
    rng = random.Random(0)
    for i in range(n_long):
        if i % 2:
            text = " ".join(str(k % 100) for k in range(long_words))
        else:
            text = " ".join(
                "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
                for _ in range(long_words // 2)
            )
        docs.insert(rng.randrange(len(docs)), {"text": text})
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def batch_het(tb_dir: Path, skip: int) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in tb_dir.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events))
    acc.Reload()
    mean = {e.step: e.value for e in acc.Scalars("loss_metrics/global_avg_loss")}
    top = {e.step: e.value for e in acc.Scalars("loss_metrics/global_max_loss")}
    hets = [top[s] - mean[s] for s in sorted(mean) if s > skip]
    return sum(hets) / len(hets)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10)
    ap.add_argument("--buffer", type=int, default=64)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.out / "corpus_with_long_docs.jsonl"
    make_corpus(corpus)
    results = {}
    for mixing in ("sequential", "rsdb"):
        config = args.out / f"{mixing}.toml"
        config.write_text(
            DEBUG_TOML.read_text()
            + f'\n[data]\nmixing = "{mixing}"\nrsdb_buffer_docs = {args.buffer}\n'
            + f'[[data.sources]]\npath = "{corpus}"\n'
        )
        dump = args.out / mixing
        run_train(
            dump,
            2,
            "--training.steps", str(args.steps),
            "--parallelism.data_parallel_shard_degree", "2",
            "--metrics.enable_tensorboard",
            config=config,
            timeout=1800,
        )  # fmt: skip
        results[mixing] = batch_het(dump / "tb", args.skip)
        print(f"{mixing}: mean BatchHet {results[mixing]:.4f}", flush=True)
    print(f"RSDB / sequential: {results['rsdb'] / results['sequential']:.3f}")


if __name__ == "__main__":
    main()
