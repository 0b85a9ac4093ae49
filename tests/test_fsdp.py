"""FSDP (FSDP2 over two gloo processes on CPU), checked where it acts: during training every parameter
is a DTensor sharded on its first dimension, each rank holding its own half; the run trains as DDP
does, saves the adapter whole, and resumes from its sharded checkpoint after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, job
from safetensors.torch import load_file

from sftpipe.execution import STRATEGY_VARIABLE, Execution
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


def probe(tmp_path, tiny_model, tokenized, strategy: str, precision: str, steps: int = 2) -> list[dict]:
    """Each rank's record (tests/ddp_probe.py) of a `steps`-step run under `strategy`, with its losses."""
    settings = TrainSettings(
        max_steps=steps, batch_size=4, learning_rate=5e-3, eval_steps=steps, logging_steps=1, precision=precision
    )
    out = tmp_path / strategy
    out.mkdir()
    (out / "job.json").write_text(job(tiny_model, tokenized, out, settings).to_json())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    subprocess.run(
        [*command, str(REPO / "tests" / "ddp_probe.py"), str(out / "job.json"), str(out)],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", STRATEGY_VARIABLE: strategy},
    )
    return [{**torch.load(out / f"rank{rank}.pt"), "losses": _losses(out / "h.json")} for rank in (0, 1)]


# What FSDP may change beside DDP: the order of the reductions (fp32), and in bf16 where the
# gathered weights are rounded for compute.
WEIGHT_TOLERANCE = {"fp32": 1e-6, "bf16": 2e-3}


def test_fsdp_shards_every_parameter_while_it_trains_as_ddp_does(tmp_path, tiny_model, tokenized, precision):
    fsdp = probe(tmp_path, tiny_model, tokenized, "fsdp", precision)
    held = [r["holdings"] for r in fsdp]
    assert [h["distributed_type"] for h in held] == ["DistributedType.FSDP"] * 2
    names = held[0]["parameters"].keys()
    assert any("lora_A" in n for n in names) and any("embed_tokens" in n for n in names) and len(names) > 2 * 7 * 2
    for name in names:
        first, second = (h["parameters"][name] for h in held)
        assert first["dtensor"] and first["sharded_on_dim_0"], name
        # Each rank holds half of the first dimension, and its own half (norm weights start at one and
        # LoRA B factors at zero, so only the randomly initialized weights tell the halves apart).
        assert first["local_shape"] == [first["shape"][0] // 2, *first["shape"][1:]] == second["local_shape"], name
        if "lora_B" not in name and "norm" not in name:
            assert first["local_sum"] != second["local_sum"], name
    # The control: the same probe sees DDP replicate every parameter whole, in twice the bytes.
    ddp = probe(tmp_path, tiny_model, tokenized, "ddp", precision)
    replicated = [r["holdings"] for r in ddp]
    assert [h["distributed_type"] for h in replicated] == ["DistributedType.MULTI_CPU"] * 2
    assert not any(p["dtensor"] or p["local_shape"] != p["shape"] for h in replicated for p in h["parameters"].values())
    assert held[0]["bytes"]["parameters"] < 0.55 * replicated[0]["bytes"]["parameters"]
    # The same training: losses, and the adapter (gathered whole on each rank) after the steps.
    assert fsdp[0]["losses"] == pytest.approx(ddp[0]["losses"], rel=WEIGHT_TOLERANCE[precision])
    for name, weight in ddp[0]["trainable"].items():
        assert torch.equal(fsdp[0]["trainable"][name], fsdp[1]["trainable"][name]), name
        assert torch.allclose(fsdp[0]["trainable"][name], weight, atol=WEIGHT_TOLERANCE[precision]), name


def test_a_run_asked_to_shard_fails_where_nothing_shards(tiny_model):
    from types import SimpleNamespace

    from sftpipe.fsdp import sharding_check
    from sftpipe.io import PipelineError
    from sftpipe.model import load_model

    # What a library that drops FSDP without a word hands the first step: a model of plain tensors.
    with pytest.raises(PipelineError, match=r"'train.strategy': fsdp was asked for, but \d+ parameters are not sharded"):
        sharding_check().on_step_end(
            SimpleNamespace(world_size=2), SimpleNamespace(global_step=1), None, model=load_model(tiny_model)
        )


def test_fsdp_and_ddp_never_resume_each_others_checkpoints(tmp_path, tiny_model, tokenized, monkeypatch):
    from sftpipe.train import LoraRecipe

    monkeypatch.setenv("WORLD_SIZE", "2")
    places = {}
    for strategy in ("ddp", "fsdp"):
        monkeypatch.setenv(STRATEGY_VARIABLE, strategy)
        places[strategy] = LoraRecipe(job(tiny_model, tokenized, tmp_path, SETTINGS)).checkpoints
    assert places["ddp"] != places["fsdp"] and places["ddp"].parent == places["fsdp"].parent


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
    # The checkpoint is torch.distributed.checkpoint's: the model's and the optimizer's shards of each rank.
    [checkpoint] = [p.parent for p in (tmp_path / "work").glob("*/checkpoint-*/trainer_state.json")][:1]
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (checkpoint / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], part
    summary = launch(run, FSDP, threads=2)
    assert 4 <= summary.resumed_from_step < STEPS and summary.steps_run == STEPS - summary.resumed_from_step
    assert _losses(tmp_path / "h.json") == pytest.approx(_losses(ddp_run[0] / "h.json"), rel=1e-4)
    assert (
        load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
        == load_file(ddp_run[0] / "adapter" / "adapter_model.safetensors").keys()
    )
