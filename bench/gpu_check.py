"""The GPU path in one shot, for a machine with CUDA (about 5 minutes on one H100-class GPU):

1. every CUDA-marked test (`pytest -m cuda`);
2. LoRA (bf16) and QLoRA (NF4, bf16 compute) training of SmolLM2-135M on the demo's tasks for a fixed
   number of steps: real tokens/s, peak GPU memory, losses;
3. the merge of each adapter into the full-precision base;
4. lm-eval ARC-Easy (its first 500 test questions, batch size auto) on the base and both merged models;
5. with two GPUs or more, the LoRA run again over two NCCL processes.

It writes one JSON and one markdown summary (`--out`, default bench/results/gpu_check.*). Where there
is no CUDA it says so and exits 0. `--dry-run` runs the same steps here, on CPU, small: the tiny
random model, 2 steps, 10 questions, two gloo processes for step 5, so that the script itself is
tested wherever the suite runs.

    .venv/bin/python bench/gpu_check.py [--dry-run] [--arc-easy FILE] [--out bench/results/gpu_check]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import host_info

REPO = Path(__file__).resolve().parents[1]
ARC_EASY = REPO.parent / "shared" / "data" / "arc" / "hf_schema" / "ARC-Easy-test.jsonl"


def prepare(work: Path, model_source: str, rows: int) -> tuple[Path, dict[str, Path]]:
    """The base model and the demo's tasks, tokenized with sftpipe's own stages."""
    from sftpipe.data import DatasetSpec, download_dataset, hydrate_dataset
    from sftpipe.model import ModelSource, materialize_base_model
    from sftpipe.splits import SplitSettings
    from sftpipe.tokenization import SPLITS, LengthSettings, tokenize_and_split

    base = work / "base"
    materialize_base_model(ModelSource(model_source), base)
    spec = DatasetSpec.from_config("demo", {"preset": "sftpipe_demo", "limit": rows})
    download_dataset(spec, work / "raw.jsonl", work / "raw.manifest.json", None)
    hydrate_dataset(spec, work / "raw.jsonl", work / "hydrated.jsonl", base)
    splits = {s: work / f"{s}.jsonl" for s in SPLITS}
    tokenize_and_split(
        [work / "hydrated.jsonl"], base, splits, work / "stats.json", LengthSettings(128), SplitSettings(0.05, 0.1, 0)
    )
    return base, splits


def train(work: Path, base: Path, splits: dict[str, Path], name: str, settings, execution=None) -> dict:
    from sftpipe.execution import Execution
    from sftpipe.launch import launch
    from sftpipe.train import TrainJob

    job = TrainJob(
        base,
        splits["train"],
        splits["validation"],
        work / name / "adapter",
        work / name / "history.json",
        work / name / "work",
        settings,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    summary = launch(job, execution or Execution(allocator="system"), threads=torch.get_num_threads())
    return {
        "steps": summary.steps,
        "world_size": summary.world_size,
        "precision": summary.precision,
        "attention": summary.attention,
        "real_tokens_per_s": summary.train_tokens_per_s,
        "train_loss": summary.train_loss,
        "eval_loss": summary.eval_loss,
        # In this process: the runs on one device train here (launch needs no child for them).
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available() and summary.world_size == 1
        else None,
    }


def arc_easy(work: Path, models: dict[str, Path], data: Path | None, limit: int) -> dict:
    from sftpipe.evaluate import evaluate_lm_harness
    from sftpipe.tasks import TaskSpec, prepare_task_data

    spec = TaskSpec("arc_easy", limit=limit, data_files={"test": str(data)} if data else None)
    prepare_task_data(spec, work / "arc_easy")  # the user's file, or the Hub
    spec = replace(spec, data_dir=str(work / "arc_easy"))
    scores = {}
    for variant, model in models.items():
        result = evaluate_lm_harness(model, [spec], work / f"{variant}.lm_eval.json", batch_size="auto")["tasks"]["arc_easy"]
        scores[variant] = {metric: result["metrics"][f"{metric},none"] for metric in ("acc", "acc_norm")}
    return scores


def cuda_tests() -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True
    )
    return {"exit_code": result.returncode, "summary": (result.stdout.strip().splitlines() or [""])[-1]}


def markdown(report: dict) -> str:
    lines = [f"# GPU check, {report['date']}", "", f"{report['device']}; {report['mode']}", ""]
    lines += [f"CUDA-marked tests: {report['cuda_tests']['summary']} (exit {report['cuda_tests']['exit_code']})", ""]
    lines += [
        "| run | steps | processes | precision | attention | real tokens/s | peak GPU memory | train loss | eval loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in report["training"].items():
        memory = f"{run['peak_gpu_memory_gb']:.2f} GB" if run["peak_gpu_memory_gb"] is not None else "n/a"
        lines.append(
            f"| {name} | {run['steps']} | {run['world_size']} | {run['precision']} | {run['attention']} | "
            f"{run['real_tokens_per_s']:.0f} | {memory} | {run['train_loss']:.4f} | {run['eval_loss']:.4f} |"
        )
    lines += ["", "| model | ARC-Easy acc | acc_norm |", "|---|---|---|"]
    lines += [f"| {m} | {s['acc']:.4f} | {s['acc_norm']:.4f} |" for m, s in report["arc_easy"].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same steps on CPU, small, to check the script")
    parser.add_argument(
        "--arc-easy",
        type=Path,
        default=ARC_EASY if ARC_EASY.exists() else None,
        help="ARC-Easy's test split in its Hub schema (default: ../shared/data's copy, else the Hub)",
    )
    parser.add_argument("--out", default="bench/results/gpu_check", help="where the .json and .md go (no suffix)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.dry_run:
        print("gpu-check: no CUDA GPU on this machine, nothing to check (--dry-run checks the script on CPU)")
        return 0

    from sftpipe.execution import Execution
    from sftpipe.merge import merge_adapter
    from sftpipe.train import TrainSettings

    small = args.dry_run
    gpus = torch.cuda.device_count()
    start = time.monotonic()
    report = {
        "date": time.strftime("%Y-%m-%d"),
        **host_info(),
        "device": torch.cuda.get_device_name(0) if gpus else "CPU (dry run)",
        "mode": "dry run: tiny model, 2 steps, 10 questions" if small else "SmolLM2-135M, 60 steps, 500 questions",
    }
    report["cuda_tests"] = {"exit_code": 0, "summary": "not run in a dry run"} if small else cuda_tests()
    steps, batch = (2, 8) if small else (60, 16)
    lora = TrainSettings(
        max_steps=steps, batch_size=batch, learning_rate=1e-3, eval_steps=steps, logging_steps=1, save_steps=10_000
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, splits = prepare(work, "tiny-random" if small else "packaged:smollm2-135m-instruct", 200 if small else 1600)
        runs = {"lora": lora, "qlora": replace(lora, quantization="qlora")}
        report["training"] = {name: train(work, base, splits, name, settings) for name, settings in runs.items()}
        if gpus >= 2 or small:  # NCCL over two GPUs; gloo over two CPU processes in a dry run
            two = Execution(gpus=2, allocator="system") if gpus >= 2 else Execution(processes=2, allocator="system")
            report["training"]["lora-2-processes"] = train(work, base, splits, "lora-2", lora, two)
        models = {"base": base}
        for name in runs:
            merge_adapter(base, work / name / "adapter", work / f"{name}-merged", history_path=work / name / "history.json")
            models[f"{name} merged"] = work / f"{name}-merged"
        report["arc_easy"] = arc_easy(work, models, args.arc_easy, 10 if small else 500)
    report["seconds"] = round(time.monotonic() - start)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if report["cuda_tests"]["exit_code"] not in (0, 5) else 0  # pytest's 5: no CUDA-marked test collected


if __name__ == "__main__":
    sys.exit(main())
