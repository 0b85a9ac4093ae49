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
from dataclasses import dataclass
from pathlib import Path

from .artifacts import TrainSummary, read_history
from .io import PipelineError

log = logging.getLogger("sftpipe")

# Shared-library names per allocator, best first: gperftools' minimal build is all tcmalloc needs.
ALLOCATOR_LIBRARIES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
ALLOCATORS = ("auto", *ALLOCATOR_LIBRARIES, "system")
# How data-parallel processes share the model: DDP replicates it in every process; FSDP shards the
# weights, gradients and optimizer state across them (FSDP2), for models one device cannot hold.
STRATEGIES = ("ddp", "fsdp")
STRATEGY_VARIABLE = "SFTPIPE_STRATEGY"  # how launch tells the training processes


@dataclass(frozen=True)
class Execution:
    """The `train:` keys that say how a run executes, not what it learns: they reach the job as
    Snakemake resources, which never rerun a job."""

    processes: int = 1  # data-parallel processes per node: gloo processes on CPU; a node with several GPUs runs one per GPU
    allocator: str = "auto"  # auto | tcmalloc | jemalloc | system: see planned_allocator
    gpus: int = 1  # GPUs the job asks for on each node
    strategy: str = "ddp"  # one of STRATEGIES; with a single process, nothing to share
    nodes: int = 1  # nodes of the job's SLURM allocation, each running its share of the processes

    @classmethod
    def of_job(cls, resources) -> Execution:
        """A training job's execution from its Snakemake resources (rules/train.smk), which hold its
        GPUs as the SLURM plugin asks for them: `gpu` on one node, `gres` (gpu:N, per node) over several."""
        nodes = resources.nodes
        gpus = resources.gpu if nodes == 1 else int(resources.gres.rpartition(":")[2])
        return cls(
            processes=resources.processes, allocator=resources.allocator, gpus=gpus, strategy=resources.strategy, nodes=nodes
        )

    def gpu_request(self) -> dict[str, int | str | None]:
        """The training job's `gpu` and `gres` resources. snakemake-executor-plugin-slurm turns `gpu`
        into `--gpus`, the job's total, both for sbatch and for the one-task, one-node jobstep it runs
        the job in, which cannot hold a total spread over several nodes ("Invalid generic resource
        (gres) specification"). Over several nodes the GPUs are asked per node instead, as `--gres`."""
        if self.nodes <= 1:
            return {"gpu": self.gpus, "gres": None}
        return {"gpu": 0, "gres": f"gpu:{self.gpus}"}

    def check_caps(self, caps: dict[str, int | None], experiment: str) -> None:
        """Refuse a job that the profile's resource caps (Snakemake's `--resources`) would change:
        Snakemake lowers a job's resource to its cap without a word, which would run fewer processes
        (gpu) or fewer nodes than the config asks for."""
        gpus = self.gpus * self.nodes
        if (cap := caps.get("gpu")) is not None and gpus > cap:
            asked = f"{self.gpus} x train.nodes {self.nodes}" if self.nodes > 1 else str(self.gpus)
            raise PipelineError(
                f"config key 'train.gpus': experiment '{experiment}' asks for {gpus} GPUs (train.gpus {asked}), "
                f"more than the profile's cap of {cap} (resources: gpu={cap}); raise the cap or ask for fewer"
            )
        if (cap := caps.get("nodes")) is not None and self.nodes > cap:
            raise PipelineError(
                f"config key 'train.nodes': experiment '{experiment}' asks for {self.nodes} nodes, more than "
                f"the profile's cap of {cap} (resources: nodes={cap}); raise the cap or ask for fewer"
            )

    @property
    def per_node(self) -> int:
        return self.gpus if self.gpus > 1 else self.processes

    @property
    def world_size(self) -> int:
        return self.nodes * self.per_node


# The `train:` keys that change nothing learned: how the job runs, and where the run is tracked
# (`train.report_to`, which reaches the job as `TrainJob.report_to`).
EXECUTION_KEYS = (*Execution.__dataclass_fields__, "report_to")


def current_allocator() -> str:
    """`tcmalloc` or `jemalloc` when this process runs on one (read from its memory map), else `system`."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return next((name for name in ALLOCATOR_LIBRARIES if f"lib{name}" in maps), "system")


def planned_allocator(choice: str) -> tuple[str, str, str | None]:
    """(allocator, why, library to preload or None) for `train.allocator`: what a training process
    started from this one will run on, and why. Torch-free, so the workflow's memory estimate can
    follow it when the job is planned.

    PyTorch's CPU tensors come from malloc. glibc's keeps the activations freed after each backward
    as holes that the next step's differently sized tensors cannot reuse; tcmalloc's size classes
    reuse them.
    """
    if choice not in ALLOCATORS:
        raise PipelineError(f"config key 'train.allocator': '{choice}' is not one of {', '.join(ALLOCATORS)}")
    if choice == "system":
        return "system", "train.allocator: system", None
    if (running := current_allocator()) != "system":
        return running, f"already loaded in this process (train.allocator: {choice})", None
    if not sys.platform.startswith("linux"):
        return "system", f"train.allocator: {choice}, but preloading another allocator needs Linux", None
    from ctypes.util import find_library

    for name in ALLOCATOR_LIBRARIES if choice == "auto" else (choice,):
        for library in ALLOCATOR_LIBRARIES[name]:
            # A conda env's own lib/ first (`--sdm conda` with gperftools), then the system's.
            in_prefix = Path(sys.prefix) / "lib" / f"lib{library}.so"
            found = str(in_prefix) if in_prefix.exists() else find_library(library)
            if found:
                return name, f"train.allocator: {choice}, {found} found", found
    if choice != "auto":
        raise PipelineError(
            f"config key 'train.allocator': {choice} is not installed "
            f"(Debian: apt install {'libtcmalloc-minimal4' if choice == 'tcmalloc' else 'libjemalloc2'}; "
            f"conda: {'gperftools' if choice == 'tcmalloc' else 'jemalloc'})"
        )
    return (
        "system",
        "train.allocator: auto, and neither tcmalloc nor jemalloc is installed "
        "(glibc's malloc needs more memory; Debian: apt install libtcmalloc-minimal4)",
        None,
    )


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
    """`sftpipe.train.train_lora(job)` in this process, or in child processes: under torchrun with
    `execution.world_size` data-parallel workers, each with its share of the threads, and/or with
    `train.allocator`'s library preloaded. Returns the run's summary."""
    from .train import train_lora

    if execution.strategy not in STRATEGIES:
        raise PipelineError(f"config key 'train.strategy': '{execution.strategy}' is not one of {', '.join(STRATEGIES)}")
    processes = execution.world_size
    allocator, why, preload = planned_allocator(execution.allocator)
    log.info("allocator %s: %s", allocator, why)
    if processes <= 1 and preload is None:
        return train_lora(job)
    launcher = launcher_command(execution, threads, slurm_allocation)
    # The job's description where every node reads it: beside the checkpoints, on the shared filesystem.
    Path(job.work_dir).mkdir(parents=True, exist_ok=True)
    # The main process removes the work directory when it is done: this one goes with it.
    with tempfile.TemporaryDirectory(dir=job.work_dir, ignore_cleanup_errors=True) as scratch:
        call = Path(scratch) / "job.json"
        call.write_text(job.to_json())
        threads_each = str(max(1, threads // execution.per_node))
        env = {**os.environ, "OMP_NUM_THREADS": threads_each, STRATEGY_VARIABLE: execution.strategy}
        if execution.nodes > 1:
            env = step_environment(env)
        if preload:
            env["LD_PRELOAD"] = " ".join(filter(None, [preload, os.environ.get("LD_PRELOAD")]))
            # tcmalloc reports every allocation over 1 GB on stderr: loading a large base model is not news.
            env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
        command = [*launcher, "-m", "sftpipe.train", str(call)]
        log.info("launching %d training process(es)%s: %s", processes, f" on {preload}" if preload else "", " ".join(command))
        result = subprocess.run(command, env=env, stdout=_fd(sys.stdout), stderr=_fd(sys.stderr))
    if result.returncode != 0:
        raise PipelineError(f"training failed (exit {result.returncode}); see the log above")
    return read_history(job.history_path)[0]
