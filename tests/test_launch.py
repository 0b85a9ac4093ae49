"""How training processes are started: alone, under torchrun on one node, or under srun and torchrun
over the nodes of a SLURM allocation, meeting at a rendezvous on the first node."""

import sys

import pytest

from sftpipe.execution import Execution
from sftpipe.io import PipelineError
from sftpipe.launch import RENDEZVOUS_PORT, launcher_command


def test_one_process_needs_no_launcher():
    assert launcher_command(Execution()) == [sys.executable]


@pytest.mark.parametrize("execution", [Execution(processes=2), Execution(gpus=4)], ids=["2 processes", "4 gpus"])
def test_one_node_runs_torchrun_standalone(execution):
    command = launcher_command(execution)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--standalone" in command
    assert f"--nproc_per_node={execution.per_node}" in command


def test_several_nodes_run_one_torchrun_per_node_meeting_on_the_first(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    asked = []

    def hostnames(nodelist):
        asked.append(nodelist)
        return ["gpu07", "gpu08"]

    execution = Execution(gpus=4, nodes=2)
    command = launcher_command(execution, hostnames)
    assert execution.world_size == 8 and asked == ["gpu[07-08]"]
    assert command[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    torchrun = command[4:]
    assert torchrun[:4] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4"]
    assert {"--nnodes=2", "--rdzv_backend=c10d", "--rdzv_id=4242", f"--rdzv_endpoint=gpu07:{RENDEZVOUS_PORT}"} <= set(torchrun)
    assert "--standalone" not in torchrun


def test_several_nodes_outside_a_large_enough_allocation_name_the_key(monkeypatch):
    for variable in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(PipelineError, match=r"config key 'train.nodes': 2 nodes need a SLURM allocation"):
        launcher_command(Execution(nodes=2))
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n1")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    with pytest.raises(PipelineError, match=r"train.nodes"):
        launcher_command(Execution(nodes=2))
