"""Running Snakemake itself from tests, and the smoke sweep that the pipeline and SLURM tests share."""

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import DOLPHIN_ROWS, GUANACO_ROWS, REPO, write_jsonl

SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]
# Every run sees a Hub token, as a user's shell would; it must never be written anywhere.
HF_TOKEN = "hf_sftpipeTestTokenNeverWritten"


# Arguments after which Snakemake runs no job: what it plans or writes needs no pinned precision.
NO_JOBS = ("-n", "--dry-run", "--lint", "--unlock", "--report", "--list-rules", "--summary", "--dag")


def pinned_precision(workdir: Path, args: tuple[str, ...]) -> None:
    """Fail a run whose jobs would train or score at `train.precision: auto`, which resolves from the
    host's CPU (see conftest.precision_is_pinned, which covers the tests' own processes)."""
    if "--configfile" not in args or any(arg in NO_JOBS for arg in args):
        return
    targets = [arg for arg in args[: args.index("--configfile")] if arg.startswith("results/")]
    if targets and all(target.startswith("results/data/") for target in targets):
        return  # the data stages train and score nothing
    merged: dict = {}
    for name in args[args.index("--configfile") + 1 :]:
        if name.startswith("-"):
            break
        merged.update(yaml.safe_load((workdir / name).read_text()) or {})
    precision = (merged.get("train") or {}).get("precision", "auto")
    assert precision != "auto", f"{' '.join(args)}: the config leaves train.precision at 'auto'; pin it in the test"


def snakemake(workdir: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Snakemake on `workdir`; `env` adds variables to the environment, or removes those it maps to None."""
    pinned_precision(workdir, args)
    variables = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_TOKEN": HF_TOKEN, **(env or {})}
    result = subprocess.run(
        [*SNAKEMAKE, "-d", str(workdir), *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        env={k: v for k, v in variables.items() if v is not None},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def stray_files(results: Path) -> list[Path]:
    """Temporary files or directories a stage left behind (atomic writes' `.<name>.tmp-<pid>`, scratch
    `.<name>.scratch-*` or `tmp*`): Snakemake deletes a failed job's declared outputs, but only its outputs."""
    return [p for p in results.rglob("*") if ".tmp-" in p.name or ".scratch-" in p.name or p.name.startswith("tmp")]


def planned_jobs(workdir: Path, configfile: Path, *targets: str) -> dict[str, int]:
    """Rule -> job count from a dry run's job table, to `targets` (default: the default target). They go
    before --configfile, which takes every argument after it."""
    out = snakemake(workdir, "-n", *targets, "--configfile", str(configfile)).stdout
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:")[1].split("Reasons:")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def concurrency(log: str) -> list[list[str]]:
    """The rules running at each job start, replayed from Snakemake's own job log."""
    running: dict[str, str] = {}
    snapshots = []
    events = re.finditer(r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    jobid: (\d+)|^Finished jobid: (\d+)", log, re.M)
    for event in events:
        if event[1]:
            running[event[2]] = event[1]
            snapshots.append(list(running.values()))
        else:
            running.pop(event[3], None)
    return snapshots


def link(target: Path, source: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source)


def smoke_config(work: Path, shared_data: Path) -> Path:
    """A sweep of two experiments over real Alpaca (through a mirror), Dolphin and Guanaco fixtures,
    and real ARC/HellaSwag eval sets, on the tiny-random model; returns the config file."""
    mirror = work / "mirror"
    link(mirror / "tatsu-lab" / "alpaca" / "train.json", shared_data / "alpaca" / "alpaca_5000.json")
    arc = shared_data / "arc" / "hf_schema"
    for split in ("train", "validation", "test"):
        link(mirror / "allenai" / "ai2_arc" / "ARC-Easy" / f"{split}.jsonl", arc / f"ARC-Easy-{split}.jsonl")
    link(mirror / "Rowan" / "hellaswag" / "validation.jsonl", shared_data / "hellaswag" / "hellaswag_val_sample1000.jsonl")
    write_jsonl(work / "fixtures" / "dolphin.jsonl", DOLPHIN_ROWS * 10)
    write_jsonl(work / "fixtures" / "guanaco.jsonl", GUANACO_ROWS * 10)
    config = {
        # smoke-r4 is tracked in TensorBoard: the training curves, then the evaluation figures, in one log.
        "experiments": {
            "smoke": {},
            "smoke-r4": {"datasets": ["alpaca", "guanaco"], "train": {"lora_r": 4, "report_to": ["tensorboard"]}},
        },
        "base_model": {"name": "tiny", "source": "tiny-random"},
        "datasets": {
            "alpaca": {"preset": "alpaca", "limit": 60},
            # The model's own chat template, so hydration per base model runs too (the preset's is ChatML).
            "dolphin": {"preset": "dolphin", "template": "chat", "path": "fixtures/dolphin.jsonl"},
            "guanaco": {"preset": "guanaco", "path": "fixtures/guanaco.jsonl"},
        },
        "data": {"mirror_dir": "mirror", "max_length": 128, "split": {"validation_fraction": 0.1, "test_fraction": 0.15}},
        "train": {"max_steps": 4, "batch_size": 4, "eval_steps": 2, "logging_steps": 1, "precision": "fp32"},
        "eval": {
            "exact_match": {"max_new_tokens": 8, "batch_size": 8, "limit": 12},
            "lm_eval": {
                "batch_size": 8,
                "tasks": [
                    {"name": "arc_easy", "limit": 6},
                    {
                        "name": "arc_challenge",
                        "limit": 6,
                        "data_files": {"test": str(arc / "ARC-Challenge-test.jsonl")},
                    },
                    {"name": "hellaswag", "limit": 6},
                ],
            },
        },
    }
    path = work / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
