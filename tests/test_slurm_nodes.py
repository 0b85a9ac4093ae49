"""Training over two nodes of a real SLURM: cluster/local-slurm.sh with LOCAL_SLURM_NODES=2 runs
slurmctld here and a slurmd in each of two network, UTS and mount namespaces (node1, node2) on a
bridge of their own, and `snakemake --profile profiles/slurm` runs a `train.nodes: 2` job there:
one torchrun agent per node, meeting at the first node's rendezvous, gloo over the bridge. Run alone
with `pytest -m slurm`."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import unavailable
from safetensors.torch import load_file
from test_slurm import REPO, cluster, job_record, slurm_jobs
from workflow import smoke_config, snakemake

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
# Not the one-node cluster's port (tests/test_slurm.py), so that both can run at once.
CTLD_PORT = "6827"
EXPERIMENTS = {
    # The reference: one node, two processes, outside SLURM.
    "one-node": {"processes": 2},
    "two-nodes": {"nodes": 2},
    "two-nodes-fsdp": {"nodes": 2, "strategy": "fsdp"},
}


def namespaces_and_links() -> str:
    return (
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        + subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    )


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> dict[str, str]:
    """A running two-node SLURM; its daemons, namespaces and links are gone afterwards."""
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed: a two-node SLURM here needs network namespaces")
    if os.geteuid() != 0:
        unavailable("a two-node SLURM here needs root (network namespaces, mounts)")
    if shutil.which("slurmctld") is None:
        if shutil.which("apt-get") is None:
            unavailable("SLURM is not installed and cannot be here: run cluster/local-slurm.sh install as root")
        cluster("install", timeout=600)
    state = tmp_path_factory.mktemp("slurm-nodes")
    before = namespaces_and_links()
    settings = {"LOCAL_SLURM_NODES": "2", "LOCAL_SLURM_GPUS": "1", "LOCAL_SLURM_CTLD_PORT": CTLD_PORT}
    try:
        exports = cluster("start", str(state), env={**settings, "LOCAL_SLURM_MIN_JOB_AGE": "7200"}).stdout
        yield dict(re.findall(r"^export (\w+)=(\S+)$", exports, re.M))
    finally:
        cluster("stop", str(state))
        assert namespaces_and_links() == before


@pytest.fixture(scope="module")
def two_node_run(two_nodes, tmp_path_factory, shared_data) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("slurm-nodes-run")
    config = yaml.safe_load(smoke_config(work, shared_data).read_text())
    config["experiments"] = {name: {"datasets": ["alpaca", "guanaco"], "train": train} for name, train in EXPERIMENTS.items()}
    (work / "nodes.yaml").write_text(yaml.safe_dump(config))
    # The data and the one-node reference on this host, then the two-node trainings on SLURM.
    snakemake(work, "results/train/one-node/adapter", "--cores", "2", "--configfile", "nodes.yaml")
    result = snakemake(
        work,
        "results/train/two-nodes/adapter",
        "results/train/two-nodes-fsdp/adapter",
        "--profile",
        str(REPO / "profiles" / "slurm"),
        "--configfile",
        "nodes.yaml",
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "2",
        # One thread a process, as in the one-node reference (two processes on 2 cores): the same
        # arithmetic, bit for bit.
        "--max-threads",
        "1",
        # A step that never starts (no --overlap, a one-task layout) fails the job at its time limit.
        "--set-resources",
        "train_lora:runtime=3",
        "--latency-wait",
        "5",
        "--retries",
        "0",
        # gloo on the interface each node's namespace has; the rendezvous is on node1's address.
        env={**two_nodes, "GLOO_SOCKET_IFNAME": two_nodes["LOCAL_SLURM_IFNAME"]},
    )
    return work, result.stderr


@pytest.mark.parametrize("experiment", ["two-nodes", "two-nodes-fsdp"])
def test_a_two_node_job_ran_one_rank_on_each_node(two_node_run, two_nodes, experiment):
    work, log = two_node_run
    [job_id] = [
        job_id
        for job_id in slurm_jobs(log, two_nodes)["train_lora"]
        if f"Comment=rule_train_lora_wildcards_{experiment} " in job_record(job_id, two_nodes)
    ]
    record = job_record(job_id, two_nodes)
    assert "JobState=COMPLETED" in record and "NodeList=node[1-2]" in record, record
    assert "TresPerNode=gres:gpu:1" in record, record  # one GPU on each node, not one for the job
    training = (work / "results" / "logs" / "train_lora" / f"{experiment}.log").read_text()
    ranks = dict(re.findall(r"rank (\d) of 2 on host (node\d)", training))
    assert ranks == {"0": "node1", "1": "node2"} or ranks == {"0": "node2", "1": "node1"}, training[-3000:]
    assert re.search(rf"srun --overlap --nodes=2 .*--rdzv_endpoint=node1:{20000 + int(job_id) % 10000}", training)


def adapter(work: Path, experiment: str) -> dict:
    return load_file(work / "results" / "train" / experiment / "adapter" / "adapter_model.safetensors")


def test_the_two_node_adapter_equals_the_one_node_two_process_one(two_node_run):
    work = two_node_run[0]
    reference, two_nodes = adapter(work, "one-node"), adapter(work, "two-nodes")
    assert reference.keys() == two_nodes.keys() and reference
    for name, tensor in reference.items():
        assert tensor.equal(two_nodes[name]), name


def test_fsdp_over_two_nodes_trains_the_same_adapter_within_fp32_tolerance(two_node_run):
    work = two_node_run[0]
    reference, sharded = adapter(work, "one-node"), adapter(work, "two-nodes-fsdp")
    assert reference.keys() == sharded.keys()
    for name, tensor in reference.items():
        assert tensor.shape == sharded[name].shape and tensor.allclose(sharded[name], rtol=1e-4, atol=1e-6), name
