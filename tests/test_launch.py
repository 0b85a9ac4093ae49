"""How training processes are started: alone, under torchrun on one node, or under srun and torchrun
over the nodes of a SLURM allocation, meeting at a rendezvous on the first node; and what a training
job asks the SLURM plugin for. tests/test_slurm_nodes.py runs it on a real two-node SLURM."""

import ast
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml
from conftest import REPO
from workflow import smoke_config, snakemake

from sftpipe.execution import Execution
from sftpipe.io import PipelineError
from sftpipe.launch import RENDEZVOUS_PORTS, launcher_command, rendezvous_port, step_environment


@pytest.mark.parametrize("stage", ["train_lora", "train_rl"])
def test_a_training_stage_imports_no_torch_before_it_launches(stage):
    """The stage's own process waits for the training process it launches: what it imports stays in
    the job's peak RSS (torch's libraries: about 200 MB), so its imports are torch-free."""
    script = REPO / "scripts" / f"{stage}.py"
    imports = [n for n in ast.parse(script.read_text()).body if isinstance(n, ast.Import | ast.ImportFrom)]
    code = ast.unparse(ast.Module(body=imports, type_ignores=[])) + "\nimport sys; print(sorted(sys.modules))"
    modules = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert "'sftpipe.launch'" in modules and "'torch'" not in modules


def test_one_process_needs_no_launcher():
    assert launcher_command(Execution()) == [sys.executable]


@pytest.mark.parametrize("execution", [Execution(processes=2), Execution(gpus=4)], ids=["2 processes", "4 gpus"])
def test_one_node_runs_torchrun_standalone(execution):
    command = launcher_command(execution)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--standalone" in command
    assert f"--nproc_per_node={execution.per_node}" in command


def allocation_of(nodes: int, hosts: list[str], asked: list[str]):
    def allocation(job_id):
        asked.append(job_id)
        return nodes, hosts

    return allocation


def test_several_nodes_run_one_torchrun_per_node_beside_the_jobstep_meeting_on_the_first(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    # What the plugin's one-task jobstep leaves in the environment: its own one node.
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu07")
    monkeypatch.setenv("SLURM_NNODES", "1")
    asked = []
    execution = Execution(gpus=4, nodes=2)
    command = launcher_command(execution, 16, allocation_of(2, ["gpu07", "gpu08"], asked))
    assert execution.world_size == 8 and asked == ["4242"]
    # A step beside the jobstep, which holds the first node's CPUs and GPUs: --overlap, one task per
    # node, each with the job's CPUs there.
    srun = command[: command.index(sys.executable)]
    layout = ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=16"]
    assert srun == ["srun", "--overlap", *layout, "--kill-on-bad-exit=1"]
    torchrun = command[len(srun) :]
    assert torchrun[:4] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4"]
    port = rendezvous_port("4242")
    assert {"--nnodes=2", "--rdzv_backend=c10d", "--rdzv_id=4242", f"--rdzv_endpoint=gpu07:{port}"} <= set(torchrun)
    assert "--standalone" not in torchrun


def test_each_job_meets_at_a_port_of_its_own():
    ports = {rendezvous_port(str(job_id)) for job_id in range(1000, 1100)}
    assert len(ports) == 100 and all(port in RENDEZVOUS_PORTS and port < 32768 for port in ports)


def test_the_srun_over_the_allocation_drops_the_jobsteps_limits():
    kept = {"SLURM_JOB_ID": "7", "SLURM_CONF": "/etc/slurm/x.conf", "PATH": "/bin", "GLOO_SOCKET_IFNAME": "ib0"}
    step = {"SLURM_NNODES": "1", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1", "SRUN_CPUS_PER_TASK": "8", "SBATCH_GPUS": "2"}
    assert step_environment({**kept, **step}) == kept


def test_several_nodes_outside_a_large_enough_allocation_name_the_key(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(PipelineError, match=r"config key 'train.nodes': 2 nodes need a SLURM allocation"):
        launcher_command(Execution(nodes=2))
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    with pytest.raises(PipelineError, match=r"train.nodes.*job 1 has 1"):
        launcher_command(Execution(nodes=2), 1, allocation_of(1, ["n1"], []))


def test_gpus_are_asked_for_the_job_on_one_node_and_per_node_over_several():
    # sbatch and the jobstep's srun take the plugin's `gpu` as --gpus, a total; `gres` is per node.
    assert Execution(gpus=4).gpu_request() == {"gpu": 4, "gres": None}
    assert Execution(gpus=4, nodes=2).gpu_request() == {"gpu": 0, "gres": "gpu:4"}
    for execution in (Execution(gpus=4), Execution(gpus=4, nodes=2), Execution(processes=2, nodes=3)):
        resources = SimpleNamespace(**execution.gpu_request(), nodes=execution.nodes, processes=execution.processes,
                                    allocator=execution.allocator, strategy=execution.strategy)  # fmt: skip
        assert Execution.of_job(resources) == execution


@pytest.mark.parametrize(
    ("execution", "caps", "message"),
    [
        (
            Execution(gpus=8, nodes=2),
            {"gpu": 8},
            r"'train.gpus': .* asks for 16 GPUs \(train.gpus 8 x train.nodes 2\), .* cap of 8",
        ),
        (Execution(gpus=2), {"gpu": 1}, r"'train.gpus': .* asks for 2 GPUs \(train.gpus 2\), .* cap of 1"),
        (Execution(nodes=4), {"nodes": 2}, r"'train.nodes': .* asks for 4 nodes, .* cap of 2"),
    ],
    ids=["gpus over nodes", "gpus", "nodes"],
)
def test_a_job_the_profiles_caps_would_shrink_is_refused_naming_the_key(execution, caps, message):
    with pytest.raises(PipelineError, match=rf"^config key {message}"):
        execution.check_caps(caps, "big")
    execution.check_caps({"gpu": 16, "nodes": 4}, "big")
    execution.check_caps({"gpu": None, "nodes": None}, "big")


def test_planning_a_job_over_the_slurm_profiles_gpu_cap_stops_in_one_line(tmp_path, shared_data):
    config = yaml.safe_load(smoke_config(tmp_path, shared_data).read_text())
    config["train"].update(gpus=8, nodes=2)
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", "--profile", str(REPO / "profiles" / "slurm"), "--configfile", "big.yaml", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "config key 'train.gpus': experiment 'smoke' asks for 16 GPUs (train.gpus 8 x train.nodes 2), "
        "more than the profile's cap of 8 (resources: gpu=8); raise the cap or ask for fewer"
    )
