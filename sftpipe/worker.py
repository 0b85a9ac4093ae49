"""A launched training process (sftpipe.launch): `python -m sftpipe.worker job.json` runs the job
described there, SFT's (sftpipe.train) or RL's (sftpipe.grpo), in this process."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path

import torch

from .artifacts import TrainSummary
from .grpo import train_rl
from .jobs import RLJob, TrainJob
from .train import die_with_parent

log = logging.getLogger("sftpipe")


def run_job(job: TrainJob | RLJob) -> TrainSummary:
    """The job's training run, in this process."""
    from . import train

    return train_rl(job) if isinstance(job, RLJob) else train.train_lora(job)


def read_job(path: str | Path) -> TrainJob | RLJob:
    """The job `launch` wrote: an RL job is the one with an `rl` section."""
    text = Path(path).read_text()
    return (RLJob if "rl" in json.loads(text) else TrainJob).from_json(text)


if __name__ == "__main__":
    from .entry import silence_library_noise

    die_with_parent()
    silence_library_noise()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if "RANK" in os.environ:
        # Where each rank runs: over several nodes, the log shows that every host took part.
        log.info("rank %s of %s on host %s", os.environ["RANK"], os.environ["WORLD_SIZE"], socket.gethostname())
    run_job(read_job(sys.argv[1]))
