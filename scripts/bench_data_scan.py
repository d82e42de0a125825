"""Throughput of the pre-training data check (`[data] validate = "full"`) on one process.

Writes a generated corpus (web-like documents of 50-600 words, ~2 KB each, plus `id` and `url`
fields) as JSON lines and as parquet, then times `trinity_titan.data.validate.scan_file` on each
and prints JSON: documents, MB, seconds, documents/s and MB/s per file. The run's scan shares the
files over its ranks, so its rate is about this times the number of ranks (file by file).

    python scripts/bench_data_scan.py --docs 200000 --out /tmp/scan_bench
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trinity_titan.data.validate import scan_file  # noqa: E402


def write_corpus(folder: Path, n: int) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    texts = [" ".join(rng.choices(words, k=rng.randint(50, 600))) for _ in range(n)]
    jsonl = folder / "corpus.jsonl"
    with jsonl.open("w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "id": i, "url": f"https://example.org/{i}"}) + "\n")
    parquet = folder / "corpus.parquet"
    table = pa.table({"text": texts, "id": list(range(n))})
    pq.write_table(table, parquet, row_group_size=65536)
    return jsonl, parquet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for path in write_corpus(args.out, args.docs):
        start = time.perf_counter()
        scan = scan_file(str(path), "text")
        seconds = time.perf_counter() - start
        assert scan.fatal is None and scan.bad == 0 and scan.documents == args.docs
        mb = path.stat().st_size / 1e6
        results[path.suffix.lstrip(".")] = {
            "documents": scan.documents,
            "MB": round(mb, 1),
            "seconds": round(seconds, 2),
            "documents_per_s": round(scan.documents / seconds),
            "MB_per_s": round(mb / seconds, 1),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
