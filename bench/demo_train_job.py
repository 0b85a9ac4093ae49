"""What the demo's training job used, read from a finished `make demo`: Snakemake's own benchmark of
the job (peak RSS of its processes, wall time), the allocator it ran on and why, and the inputs
sftpipe.resources' estimate reads (training settings, the tokenized split's stats), so that
tests/test_resources.py recomputes what the job asks for and holds it above what it used.

    .venv/bin/python bench/demo_train_job.py [--results results] [--experiment demo] [--job train_rl]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import time
from pathlib import Path

from common import host_info

# Each training job's directory under results/.
JOBS = {"train_lora": "train", "train_rl": "rl"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results")
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--job", choices=tuple(JOBS), default="train_lora", help="SFT's training job or RL's")
    parser.add_argument("--out", default="bench/results/demo_train_job.json")
    args = parser.parse_args()
    results, name = Path(args.results), args.experiment
    with open(results / "benchmarks" / args.job / f"{name}.tsv") as f:
        [measured] = list(csv.DictReader(f, delimiter="\t"))
    history = json.loads((results / JOBS[args.job] / name / "history.json").read_text())["summary"]
    stats = json.loads((results / "data" / "tokenized" / name / "stats.json").read_text())
    log = (results / "logs" / args.job / f"{name}.log").read_text()
    report = {
        "benchmark": f"the demo's {args.job} job: what it used beside what sftpipe.resources asks for it",
        "job": args.job,
        "date": time.strftime("%Y-%m-%d"),
        **host_info(),
        "allocator": history["allocator"],
        "allocator_why": re.search(r"allocator \w+: (.*)", log)[1],
        "precision": history["precision"],
        "measured": {
            "peak_rss_mb": float(measured["max_rss"]),
            "minutes": float(measured["s"]) / 60,
            "mean_load": float(measured["mean_load"]),
        },
        "estimate_inputs": {
            "settings": history["settings"],
            "max_length": stats["settings"]["max_length"],
            "stats": {
                "settings": stats["settings"],
                "train": {k: stats["train"][k] for k in ("rows", "tokens", "length_histogram")},
            },
        },
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["measured"]))


if __name__ == "__main__":
    main()
