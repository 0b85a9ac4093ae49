"""The SLURM profile on a real SLURM: a single-node cluster from Debian's packages (munge, slurmctld,
slurmd) with a `gpu` gres, started by cluster/local-slurm.sh, runs the smoke sweep through
`snakemake --profile profiles/slurm`. Run alone with `pytest -m slurm`."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, unavailable
from workflow import smoke_config, snakemake

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
CLUSTER = REPO / "cluster" / "local-slurm.sh"
# Rules that run on the submitting host (`localrules`): downloads, the base model, the reports.
LOCAL_RULES = {"download_dataset", "prepare_eval_data", "materialize_base_model", "report", "summarize_experiments", "all"}
GPU_RULES = {"train_lora", "evaluate_lm_harness", "evaluate_base_lm_harness", "evaluate_exact_match"}


def cluster(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """A running single-node SLURM; every daemon it started is stopped afterwards."""
    if shutil.which("slurmctld") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            unavailable("SLURM is not installed and cannot be here: run cluster/local-slurm.sh install as root")
        cluster("install", timeout=600)
    state = tmp_path_factory.mktemp("slurm-state")
    # Two (device-less) GPUs, so that a training job can ask for both; job records kept for two hours,
    # so that the first jobs of a slow run are still there to check when it ends.
    exports = cluster("start", str(state), env={"LOCAL_SLURM_GPUS": "2", "LOCAL_SLURM_MIN_JOB_AGE": "7200"}).stdout
    env = dict(re.findall(r"^export (\w+)=(\S+)$", exports, re.M))
    try:
        yield env
    finally:
        cluster("stop", str(state))
        left = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True).stdout.split()
        alive = [pid for pid in left if Path(f"/proc/{pid}/cmdline").exists() and Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert not alive, f"daemons still running after stop: {alive}"


@pytest.fixture(scope="module")
def slurm_run(slurm, tmp_path_factory, shared_data) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("slurm-run")
    smoke_config(work, shared_data)
    # No HF_*_OFFLINE here: compute jobs must go offline by themselves.
    result = snakemake(
        work,
        "--profile",
        str(REPO / "profiles" / "slurm"),
        "--configfile",
        "smoke.yaml",
        # What a one-node test cluster needs on top of the profile: squeue for job status (no
        # slurmdbd here), status checks soon after submission, jobs sized to the node's 2 CPUs.
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--max-threads",
        "2",
        # A training job holding two GPUs runs two DDP processes (gloo here: the GPUs have no device).
        "--set-resources",
        "train_lora:gpu=2",
        "--latency-wait",
        "5",
        "--retries",
        "0",
        env={**slurm, "HF_HUB_OFFLINE": None, "HF_DATASETS_OFFLINE": None},
    )
    return work, result.stderr


def slurm_jobs(log: str, env: dict[str, str]) -> dict[str, list[str]]:
    """Rule -> SLURM job ids of this run, from SLURM's own records (the plugin names jobs by run id)."""
    [run_id] = set(re.findall(r"SLURM run ID: ([\w-]+)", log))
    listing = subprocess.run(
        ["squeue", "-h", "-t", "all", "--name", run_id, "-o", "%i %k"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    ).stdout
    jobs: dict[str, list[str]] = {}
    # The plugin comments each job with rule_<rule>[_wildcards_<values>].
    for job_id, comment in (line.split() for line in listing.splitlines()):
        jobs.setdefault(comment.removeprefix("rule_").split("_wildcards_")[0], []).append(job_id)
    return jobs


def job_record(job_id: str, env: dict[str, str]) -> str:
    """SLURM's one-line record of a job (state, TRES requested, ...)."""
    return subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True, env={**os.environ, **env}
    ).stdout


def test_every_compute_job_ran_as_a_slurm_job(slurm_run, slurm):
    work, log = slurm_run
    # Snakemake marks the jobs it runs itself "localrule", those it submits "rule".
    assert set(re.findall(r"^localrule (\w+):", log, re.M)) == LOCAL_RULES
    compute = re.findall(r"^rule (\w+):", log, re.M)
    jobs = slurm_jobs(log, slurm)
    assert {rule: len(ids) for rule, ids in jobs.items()} == {rule: compute.count(rule) for rule in set(compute)}
    assert not LOCAL_RULES & set(jobs)
    for job_id in (i for ids in jobs.values() for i in ids):
        record = job_record(job_id, slurm)
        assert "JobState=COMPLETED" in record, record


def test_gpu_rules_requested_the_gpu_gres_and_data_rules_did_not(slurm_run, slurm):
    jobs = slurm_jobs(slurm_run[1], slurm)

    def gpus(job_id: str) -> int:
        found = re.search(r"TresPerJob=gres:gpu:(\d+)", job_record(job_id, slurm))
        return int(found[1]) if found else 0

    assert len(jobs["train_lora"]) == 2
    for rule, ids in jobs.items():
        expected = 2 if rule == "train_lora" else 1 if rule in GPU_RULES else 0
        assert [gpus(job_id) for job_id in ids] == [expected] * len(ids), rule


def test_a_training_job_holding_two_gpus_ran_two_processes(slurm_run):
    for experiment in ("smoke", "smoke-r4"):
        history = json.loads((slurm_run[0] / "results" / "train" / experiment / "history.json").read_text())
        assert history["summary"]["world_size"] == 2


def test_compute_jobs_run_offline_and_downloads_online(slurm_run):
    logs = slurm_run[0] / "results" / "logs"
    assert "Hugging Face Hub client in online mode" in (logs / "download_dataset" / "alpaca.log").read_text()
    for rule in ("tokenize_and_split", "train_lora", "evaluate_lm_harness"):
        for path in (logs / rule).rglob("*.log"):
            assert "Hugging Face Hub client in offline mode" in path.read_text(), path


def test_slurm_artifacts_equal_the_local_run(slurm_run, sweep_run):
    slurm_results, local_results = slurm_run[0] / "results", sweep_run[0] / "results"
    data = sorted(p.relative_to(local_results) for p in (local_results / "data").rglob("*.jsonl"))
    assert len(data) >= 12
    for path in data:
        assert (slurm_results / path).read_bytes() == (local_results / path).read_bytes(), path
    for path in ("eval/base_model/tiny/lm_eval.json", "eval/smoke/base/exact_match.json"):
        assert (slurm_results / path).read_text() == (local_results / path).read_text(), path
    for experiment in ("smoke", "smoke-r4"):
        summaries = [
            json.loads((r / "train" / experiment / "history.json").read_text())["summary"] for r in (slurm_results, local_results)
        ]
        assert summaries[0]["steps"] == summaries[1]["steps"] == 4
        assert summaries[0]["train_rows"] == summaries[1]["train_rows"]
