"""Hydrate + tokenize throughput on the 5,000-row Alpaca sample, in one run, against
(a) the reference notebooks' way: a `datasets.map` tokenizing one row at a time, and
(b) the raw speed of one batched fast-tokenizer call on the same texts.
Ours includes templating, masking, EOS, the hash split, stats and writing JSONL. Each way runs
`--repeats` times, interleaved, and its median time counts, so one noisy run does not decide the
ratio. Writes JSON.

    .venv/bin/python bench/data_throughput.py [--alpaca ../shared/data/alpaca/alpaca_5000.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import host_info, smollm2

from sftpipe.data import DatasetSpec, download_dataset, hydrate_dataset
from sftpipe.io import read_jsonl
from sftpipe.model import load_tokenizer
from sftpipe.splits import SplitSettings
from sftpipe.tokenization import SPLITS, LengthSettings, tokenize_and_split

# The Alpaca prompt as the reference notebooks write it, one format string per case.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpaca", default=str(Path(__file__).resolve().parents[2] / "shared/data/alpaca/alpaca_5000.json"))
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/data_throughput.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = smollm2(tmp)
        tokenizer = load_tokenizer(model_dir)
        spec = DatasetSpec.from_config("alpaca", {"preset": "alpaca", "path": args.alpaca})
        download_dataset(spec, tmp / "raw.jsonl", tmp / "manifest.json", None)
        raw = list(read_jsonl(tmp / "raw.jsonl"))
        texts = [
            (ALPACA_WITH_INPUT if r["input"] else ALPACA_NO_INPUT).format(**r) + r["output"] + tokenizer.eos_token for r in raw
        ]

        from datasets import Dataset

        def notebooks_tokenize(row):
            template = ALPACA_WITH_INPUT if row["input"] else ALPACA_NO_INPUT
            text = template.format(**row) + row["output"]
            out = tokenizer(text, truncation=True, max_length=args.max_length, padding="max_length")
            out["labels"] = out["input_ids"].copy()
            return out

        dataset = Dataset.from_list(raw)

        def ours() -> None:
            hydrate_dataset(spec, tmp / "raw.jsonl", tmp / "hydrated.jsonl")
            tokenize_and_split(
                [tmp / "hydrated.jsonl"],
                model_dir,
                {s: tmp / f"{s}.jsonl" for s in SPLITS},
                tmp / "stats.json",
                LengthSettings(args.max_length),
                SplitSettings(),
            )

        ways: dict[str, Callable[[], object]] = {
            "raw": lambda: tokenizer(texts, truncation=True, max_length=args.max_length),
            "notebooks": lambda: dataset.map(notebooks_tokenize, batch_size=1, load_from_cache_file=False, keep_in_memory=True),
            "ours": ours,
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, way in ways.items():
                start = time.perf_counter()
                way()
                times[name].append(time.perf_counter() - start)
        raw_seconds, notebooks_seconds, ours_seconds = (statistics.median(times[name]) for name in ways)

    rows = len(raw)
    result = {
        "benchmark": "hydrate + tokenize, Alpaca 5,000 rows, SmolLM2 tokenizer",
        "date": time.strftime("%Y-%m-%d"),
        **host_info(),
        "rows": rows,
        "max_length": args.max_length,
        "repeats": args.repeats,
        "seconds": times,
        "raw_batched_tokenizer_rows_per_s": rows / raw_seconds,
        "notebooks_map_batch_size_1_rows_per_s": rows / notebooks_seconds,
        "sftpipe_hydrate_and_tokenize_rows_per_s": rows / ours_seconds,
        "sftpipe_fraction_of_raw_tokenizer": raw_seconds / ours_seconds,
        "sftpipe_speedup_over_notebooks": notebooks_seconds / ours_seconds,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
