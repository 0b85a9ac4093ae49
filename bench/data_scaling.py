"""How the data stages' cost grows with the rows: download, hydrate, filter-and-mix (exact dedup,
MinHash near-dedup, decontamination against ARC-Easy's test set, mixing) and tokenize-and-split on
deterministic Alpaca-format datasets of 10k, 100k and 1M rows, each stage in its own process.

Each row is a real Alpaca row with the words of each field shuffled (seeded), so rows keep the real
vocabulary and lengths without being copies; on top of them known shares of planted exact
duplicates (a copy of an earlier row with its case and spacing changed), planted near-duplicates
(an earlier long row with one word replaced, word 5-shingle Jaccard >= 0.9) and planted ARC-Easy
test questions with their answers measure recall; dedup's false positives are the other rows it
removes whose own Jaccard with their match is below the threshold.

Per stage: seconds per 1k rows and peak RSS, the stage's own process and its largest worker
(the filters' MinHash workers), as JSON and a plot. Time and memory are measured here, never in tests.

    .venv/bin/python bench/data_scaling.py [--rows 10000 100000 1000000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from common import host_info, smollm2

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
EXACT_SHARE = 0.03
NEAR_SHARE = 0.03
NEAR_MIN_WORDS = 100  # one replaced word leaves >= 0.9 of the 5-shingles of a row this long
NEAR_MIN_JACCARD = 0.9
CONTAMINATION_SHARE = 0.002
ARC = SHARED / "arc" / "hf_schema" / "ARC-Easy-test.jsonl"
STAGES = ("download", "hydrate", "filter_and_mix", "tokenize_and_split")


def generate(rows: int, out: Path, seed: int = 0) -> dict[str, list[str]]:
    """Write `rows` Alpaca rows (with ids) to `out`; return the ids of the planted duplicates by kind."""
    from sftpipe.io import read_jsonl
    from sftpipe.words import words

    real = json.loads((SHARED / "alpaca" / "alpaca_5000.json").read_text())
    rng = random.Random(seed)
    arc = list(read_jsonl(ARC))
    planted: dict[str, list[str]] = {"exact": [], "near": [], "contamination": []}
    long_rows: deque[dict[str, str]] = deque(maxlen=1000)  # recent rows long enough for a near-duplicate
    recent: deque[dict[str, str]] = deque(maxlen=1000)
    with out.open("w") as f:
        i = 0
        while i < rows:
            kind = rng.random()
            row_id = f"r{i}"
            if recent and kind < EXACT_SHARE:
                source = rng.choice(recent)
                row = {k: (v.upper() if k == "output" else v.replace(" ", "  ")) for k, v in source.items() if k != "id"}
                planted["exact"].append(row_id)
            elif long_rows and kind < EXACT_SHARE + NEAR_SHARE:
                source = rng.choice(long_rows)
                tokens = source["output"].split(" ")
                tokens[rng.randrange(len(tokens))] = f"changed{i}"
                row = {"instruction": source["instruction"], "input": source["input"], "output": " ".join(tokens)}
                if jaccard(text(row), text(source)) < NEAR_MIN_JACCARD:
                    continue  # a word holding several \w+ words can change more shingles: not planted
                planted["near"].append(row_id)
            elif kind < EXACT_SHARE + NEAR_SHARE + CONTAMINATION_SHARE:
                question = rng.choice(arc)
                answer = question["choices"]["text"][question["choices"]["label"].index(question["answerKey"])]
                row = {"instruction": question["question"], "input": "", "output": answer}
                planted["contamination"].append(row_id)
            else:
                source = real[rng.randrange(len(real))]
                row = {key: shuffled(source[key], rng) for key in ("instruction", "input", "output")}
                row = {"id": row_id, **row}
                recent.append(row)
                if len(words(text(row))) >= NEAR_MIN_WORDS:
                    long_rows.append(row)
            f.write(json.dumps({"id": row_id, **{k: v for k, v in row.items() if k != "id"}}) + "\n")
            i += 1
    return planted


def shuffled(text: str, rng: random.Random) -> str:
    """The text's words in a new order: the real sample's vocabulary and lengths, but no 5-shingle or
    13-gram shared with the rows drawn from the same real row, nor with any evaluation set."""
    tokens = text.split(" ")
    rng.shuffle(tokens)
    return " ".join(tokens)


def run_stage(stage: str, work: Path, model_dir: Path, threads: int) -> None:
    """One stage, in this process (the parent runs each in a fresh one)."""
    from sftpipe.data import DatasetSpec, download_dataset, hydrate_dataset
    from sftpipe.filters import FilterSettings, filter_and_mix
    from sftpipe.splits import SplitSettings
    from sftpipe.tasks import TaskSpec
    from sftpipe.tokenization import SPLITS, LengthSettings, tokenize_and_split

    spec = DatasetSpec.from_config("scaling", {"preset": "alpaca", "path": str(work / "source.jsonl")})
    if stage == "download":
        download_dataset(spec, work / "raw.jsonl", work / "manifest.json", None)
    elif stage == "hydrate":
        hydrate_dataset(spec, work / "raw.jsonl", work / "hydrated.jsonl")
    elif stage == "filter_and_mix":
        arc = TaskSpec("arc_easy", data_files={"test": str(ARC)}, data_dir=str(work / "arc_easy"))
        filter_and_mix(
            [work / "hydrated.jsonl"],
            {"scaling": None},
            work / "mixed.jsonl",
            work / "filters.json",
            work / "removed.jsonl",
            FilterSettings(),
            SplitSettings(),
            [arc],
            threads=threads,
        )
    else:
        tokenize_and_split(
            [work / "mixed.jsonl"],
            model_dir,
            {s: work / f"{s}.jsonl" for s in SPLITS},
            work / "tokenized.json",
            LengthSettings(512),
            SplitSettings(),
        )
    print(
        json.dumps(
            {
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            }
        )
    )


def text(row: dict[str, str]) -> str:
    return " ".join(row[key] for key in ("instruction", "input", "output"))


def jaccard(a: str, b: str) -> float:
    from sftpipe.words import ngrams, words

    x, y = ngrams(words(a), 5), ngrams(words(b), 5)
    return len(x & y) / len(x | y) if x | y else 1.0


def dedup_quality(work: Path, planted: dict[str, list[str]], threshold: float) -> dict:
    """Recall on the planted duplicates, and the other removals split by their true Jaccard."""
    from sftpipe.io import read_jsonl

    removed = {r["id"].removeprefix("scaling-"): r for r in read_jsonl(work / "removed.jsonl")}
    dedup = {k: r for k, r in removed.items() if r["reason"] in ("exact_duplicate", "near_duplicate")}
    planted_ids = set(planted["exact"]) | set(planted["near"])  # the duplicates dedup should find
    found = {kind: sum(1 for i in ids if i in dedup) for kind, ids in planted.items() if kind != "contamination"}
    # A question planted twice goes the second time as an exact duplicate: removed either way.
    contaminated = sum(1 for i in planted["contamination"] if i in removed)
    others = {k: r for k, r in dedup.items() if k not in planted_ids}
    content = {}
    wanted = {r["match"] for r in others.values()} | set(others)
    for row in read_jsonl(work / "hydrated.jsonl"):
        if row["id"] in wanted or row["id"].removeprefix("scaling-") in wanted:
            content[row["id"]] = row["content"]
    below = sum(1 for k, r in others.items() if jaccard(content[f"scaling-{k}"], content[r["match"]]) < threshold)
    return {
        "planted": {kind: len(ids) for kind, ids in planted.items()},
        "found": found,
        "recall": sum(found.values()) / max(1, len(planted_ids)),
        "contamination_recall": contaminated / max(1, len(planted["contamination"])),
        "other_removed": len(others),
        "false_positives": below,
        "removed_by_reason": {
            reason: sum(1 for r in removed.values() if r["reason"] == reason)
            for reason in ("exact_duplicate", "near_duplicate", "eval_contamination", "test_overlap")
        },
    }


def measure(rows: int, model_dir: Path, threads: int, scratch: Path) -> dict:
    from sftpipe.filters import FilterSettings
    from sftpipe.tasks import TaskSpec, prepare_task_data

    work = scratch / f"rows{rows}"
    work.mkdir()
    planted = generate(rows, work / "source.jsonl")
    # The evaluation set's own rule (prepare_eval_data) prepares it, once whatever the rows.
    prepare_task_data(TaskSpec("arc_easy", data_files={"test": str(ARC)}), work / "arc_easy")
    result: dict = {"rows": rows, "stages": {}}
    for stage in STAGES:
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, __file__, "--stage", stage, "--work", str(work), "--model", str(model_dir)]
            + ["--threads", str(threads)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if out.returncode:
            sys.exit(f"{stage} at {rows} rows failed:\n{out.stderr}")
        seconds = time.perf_counter() - start
        memory = json.loads(out.stdout.strip().splitlines()[-1])
        result["stages"][stage] = {"seconds": seconds, "seconds_per_1k_rows": seconds / rows * 1000, **memory}
        print(rows, stage, result["stages"][stage], flush=True)
    result["dedup"] = dedup_quality(work, planted, FilterSettings().near_dedup_threshold)
    print(rows, result["dedup"], flush=True)
    for path in work.glob("*.jsonl"):
        path.unlink()  # 1M rows take gigabytes; the next size needs the disk
    return result


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rows = [r["rows"] for r in results]
    for stage in STAGES:
        left.plot(rows, [r["stages"][stage]["seconds_per_1k_rows"] for r in results], marker="o", label=stage)
        right.plot(rows, [r["stages"][stage]["peak_rss_mb"] for r in results], marker="o", label=stage)
    for ax, label in ((left, "seconds per 1k rows"), (right, "peak RSS of the stage's process (MB)")):
        ax.set_xscale("log")
        ax.set_xlabel("rows")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    left.legend()
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--threads", type=int, default=2, help="MinHash worker processes of filter-and-mix")
    parser.add_argument("--out", default="bench/results/data_scaling.json")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        run_stage(args.stage, Path(args.work), Path(args.model), args.threads)
        return

    with tempfile.TemporaryDirectory(dir=ROOT / "results" if (ROOT / "results").is_dir() else None) as tmp:
        model_dir = smollm2(Path(tmp)).resolve()
        results = [measure(rows, model_dir, args.threads, Path(tmp)) for rows in args.rows]
    growth = {}
    for small, large in zip(results, results[1:], strict=False):
        growth[f"{large['rows']}/{small['rows']}"] = {
            stage: large["stages"][stage]["seconds"] / small["stages"][stage]["seconds"] for stage in STAGES
        }
    report = {
        "host": host_info(),
        "threads": args.threads,
        "settings": "alpaca preset, SmolLM2-135M tokenizer, max_length 512, default filters (exact + MinHash near-dedup at "
        "0.85, 13-gram decontamination against ARC-Easy test), default split",
        "results": results,
        "time_growth": growth,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(json.dumps(growth, indent=2))


if __name__ == "__main__":
    main()
