"""FSDP (FSDP2 over two gloo processes on CPU): the same training as DDP's, an adapter saved whole, and
a run killed mid-way that resumes from its sharded checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import job
from safetensors.torch import load_file

from sftpipe.execution import Execution
from sftpipe.launch import launch
from sftpipe.train import TrainSettings

STEPS = 24
SETTINGS = TrainSettings(
    max_steps=STEPS, batch_size=4, learning_rate=5e-3, eval_steps=STEPS, logging_steps=2, save_steps=4, precision="fp32"
)
DDP, FSDP = Execution(processes=2, allocator="system"), Execution(processes=2, allocator="system", strategy="fsdp")


def _losses(path):
    return [h["loss"] for h in json.loads(path.read_text())["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model, tokenized):
    out = tmp_path_factory.mktemp("ddp")
    return out, launch(job(tiny_model, tokenized, out, SETTINGS), DDP, threads=2)


def test_fsdp_trains_as_ddp_does_and_saves_the_whole_adapter(tmp_path, tiny_model, tokenized, ddp_run):
    fsdp = launch(job(tiny_model, tokenized, tmp_path, SETTINGS), FSDP, threads=2)
    assert fsdp.world_size == 2 and fsdp.steps == STEPS
    assert _losses(tmp_path / "h.json") == pytest.approx(_losses(ddp_run[0] / "h.json"), rel=1e-4)
    sharded, replicated = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (tmp_path, ddp_run[0]))
    # Every LoRA tensor whole, not one process's shard: the shapes and values of DDP's.
    assert sharded.keys() == replicated.keys() and len(sharded) == 2 * 7 * 2
    for name, tensor in replicated.items():
        assert sharded[name].shape == tensor.shape, name
        assert torch.allclose(sharded[name], tensor, atol=1e-5), name


def test_a_killed_fsdp_run_resumes_from_its_sharded_checkpoint(tmp_path, tiny_model, tokenized, ddp_run):
    run = job(tiny_model, tokenized, tmp_path, SETTINGS)
    call = (
        "from sftpipe.execution import Execution\nfrom sftpipe.launch import launch\nfrom sftpipe.train import TrainJob\n"
        f"launch(TrainJob.from_json({run.to_json()!r}), Execution(processes=2, allocator='system', strategy='fsdp'), threads=2)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", call], start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "work").glob("*/checkpoint-*/trainer_state.json")):
        assert process.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both training processes
    process.wait()
    summary = launch(run, FSDP, threads=2)
    assert 4 <= summary.resumed_from_step < STEPS and summary.steps_run == STEPS - summary.resumed_from_step
    assert _losses(tmp_path / "h.json") == pytest.approx(_losses(ddp_run[0] / "h.json"), rel=1e-4)
    assert (
        load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
        == load_file(ddp_run[0] / "adapter" / "adapter_model.safetensors").keys()
    )
