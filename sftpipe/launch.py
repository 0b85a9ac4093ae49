"""How a training run executes: in this process, or relaunched in child processes under torchrun
(one data-parallel worker per GPU, or `train.processes` gloo workers on CPU) and/or with another
memory allocator preloaded. None of it changes what the run learns, so none of it is in the
training's cache key."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .artifacts import TrainSummary, read_history
from .execution import STRATEGIES, STRATEGY_VARIABLE, Execution, planned_allocator
from .io import PipelineError

log = logging.getLogger("sftpipe")


def _fd(stream) -> int | None:
    """The file descriptor behind `stream`, so a child process writes where this one does (the rule's log)."""
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


# The rendezvous port of a job is drawn from its SLURM job id, so that two jobs whose first node is
# the same meet at different ports; below Linux's ephemeral ports (32768 on), which the kernel hands
# to outgoing connections.
RENDEZVOUS_PORTS = range(20000, 30000)


def rendezvous_port(job_id: str) -> int:
    return RENDEZVOUS_PORTS[int(job_id) % len(RENDEZVOUS_PORTS)]


def launcher_command(
    execution: Execution, threads: int = 1, allocation: Callable[[str], tuple[int, list[str]]] = lambda job_id: (0, [])
) -> list[str]:
    """What starts the training processes: this Python alone, torchrun on this node, or, over several
    nodes, one srun task per node each running torchrun, meeting at a c10d rendezvous on the
    allocation's first node. `allocation` gives a SLURM job's node count and host names.

    snakemake-executor-plugin-slurm runs the job inside a one-task step (`srun -n1`) on the first
    node, which holds the CPUs and GPUs the job has there: a step beside it must share them
    (`--overlap`), else it waits for them forever."""
    if execution.world_size <= 1:
        return [sys.executable]
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={execution.per_node}"]
    if execution.nodes <= 1:
        return [*torchrun, "--standalone"]
    job_id = os.environ.get("SLURM_JOB_ID")
    nodes, hosts = allocation(job_id) if job_id else (0, [])
    if nodes < execution.nodes:
        raise PipelineError(
            f"config key 'train.nodes': {execution.nodes} nodes need a SLURM allocation of as many "
            f"({f'job {job_id} has {nodes}' if job_id else 'not in a SLURM job'}; run with --profile profiles/slurm)"
        )
    return [
        "srun", "--overlap", f"--nodes={execution.nodes}", f"--ntasks={execution.nodes}", "--ntasks-per-node=1",
        f"--cpus-per-task={threads}", "--kill-on-bad-exit=1",
        *torchrun, f"--nnodes={execution.nodes}", "--rdzv_backend=c10d", f"--rdzv_id={job_id}",
        f"--rdzv_endpoint={hosts[0]}:{rendezvous_port(job_id)}",
    ]  # fmt: skip


def slurm_allocation(job_id: str) -> tuple[int, list[str]]:
    """A SLURM job's node count and host names, from slurmctld: inside the plugin's jobstep the
    environment describes that one-node step (SLURM_JOB_NODELIST names its node alone)."""
    record = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    fields = dict(field.split("=", 1) for field in record.split() if "=" in field)
    hosts = subprocess.run(["scontrol", "show", "hostnames", fields["NodeList"]], capture_output=True, text=True, check=True)
    return int(fields["NumNodes"]), hosts.stdout.split()


def step_environment(env: dict[str, str]) -> dict[str, str]:
    """`env` for an srun over the whole allocation: without the variables of the step this process
    runs in (SLURM_NNODES=1, SLURM_NTASKS=1, ...), which srun would take as its own limits ("Only
    allocated 1 nodes asked for 2"). The job's id stays, so that srun finds the allocation."""
    keep = {"SLURM_JOB_ID", "SLURM_CONF"}
    return {k: v for k, v in env.items() if k in keep or not k.startswith(("SLURM_", "SRUN_", "SBATCH_"))}


def launch(job, execution: Execution, threads: int = 1) -> TrainSummary:
    """The training run of `job` (SFT's TrainJob or RL's RLJob) in this process, or in child processes
    (sftpipe.worker): under torchrun with `execution.world_size` data-parallel workers, each with its
    share of the threads, and/or with `train.allocator`'s library preloaded. Returns the run's summary."""
    from .worker import job_file_text, run_job

    if execution.strategy not in STRATEGIES:
        raise PipelineError(f"config key 'train.strategy': '{execution.strategy}' is not one of {', '.join(STRATEGIES)}")
    processes = execution.world_size
    allocator, why, preload = planned_allocator(execution.allocator)
    log.info("allocator %s: %s", allocator, why)
    if processes <= 1 and preload is None:
        return run_job(job)
    launcher = launcher_command(execution, threads, slurm_allocation)
    # The job's description where every node reads it: beside the checkpoints, on the shared filesystem.
    Path(job.work_dir).mkdir(parents=True, exist_ok=True)
    # The main process removes the work directory when it is done: this one goes with it.
    with tempfile.TemporaryDirectory(dir=job.work_dir, ignore_cleanup_errors=True) as scratch:
        call = Path(scratch) / "job.json"
        call.write_text(job_file_text(job))
        threads_each = str(max(1, threads // execution.per_node))
        env = {**os.environ, "OMP_NUM_THREADS": threads_each, STRATEGY_VARIABLE: execution.strategy}
        if execution.nodes > 1:
            env = step_environment(env)
        if preload:
            env["LD_PRELOAD"] = " ".join(filter(None, [preload, os.environ.get("LD_PRELOAD")]))
            # tcmalloc reports every allocation over 1 GB on stderr: loading a large base model is not news.
            env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
        command = [*launcher, "-m", "sftpipe.worker", str(call)]
        log.info("launching %d training process(es)%s: %s", processes, f" on {preload}" if preload else "", " ".join(command))
        result = subprocess.run(command, env=env, stdout=_fd(sys.stdout), stderr=_fd(sys.stderr))
    if result.returncode != 0:
        raise PipelineError(f"training failed (exit {result.returncode}); see the log above")
    return read_history(job.history_path)[0]
