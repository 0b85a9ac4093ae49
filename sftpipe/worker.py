"""A launched training process (sftpipe.launch): `python -m sftpipe.worker job.json` runs the job
described there in this process. The file names the job's class; the job names its `runner`, the
function that trains it (sftpipe.train's train_lora for SFT, sftpipe.grpo's train_rl for RL). Both
are looked up by name, so that no stage's code holds another stage's trainer."""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("sftpipe")


def resolve(name: str) -> Any:
    """`package.module:attribute`, imported."""
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


def run_job(job):
    """The job's training run, in this process; its summary."""
    return resolve(job.runner)(job)


def job_file_text(job) -> str:
    """What `read_job` reads back: the job's class and its fields."""
    return json.dumps({"job": f"{type(job).__module__}:{type(job).__qualname__}", "fields": json.loads(job.to_json())})


def read_job(path: str | Path):
    payload = json.loads(Path(path).read_text())
    return resolve(payload["job"]).from_json(json.dumps(payload["fields"]))


if __name__ == "__main__":
    import torch

    from .entry import silence_library_noise
    from .train import die_with_parent

    die_with_parent()
    silence_library_noise()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if "RANK" in os.environ:
        # Where each rank runs: over several nodes, the log shows that every host took part.
        log.info("rank %s of %s on host %s", os.environ["RANK"], os.environ["WORLD_SIZE"], socket.gethostname())
    run_job(read_job(sys.argv[1]))
