"""How a training run executes, as the config states it and as a training process finds it: the
processes, strategy and allocator. Torch-free, so the workflow, the config checks and the training
processes all read it; none of it changes what the run learns, so none of it is in the training's
cache key."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .io import PipelineError

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
