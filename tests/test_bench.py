"""The benchmarks' configurations are accepted on every host: bench/train_throughput.py builds each
TRL baseline's arguments as a native-bf16 host would and as an fp32-only one would, and says the order
its rounds train in."""

import subprocess
import sys

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def dry_run() -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--dry-run", "--rounds", "3"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_the_training_bench_builds_every_variant_in_both_precisions(dry_run):
    # TRL as shipped trains in bf16 where the CPU has it, which transformers accepts on a CPU run only with use_cpu.
    assert "trl-defaults (native bf16 True): bf16 True, use_cpu True" in dry_run.stdout
    assert "trl-defaults (native bf16 False): bf16 False, use_cpu True" in dry_run.stdout
    assert "notebooks (native bf16 True): bf16 False, use_cpu True" in dry_run.stdout
    ablations = [line.split(":")[0] for line in dry_run.stdout.splitlines() if ": precision auto, allocator " in line]
    assert ablations[0] == "sftpipe" and len(ablations) >= 6


def test_the_training_bench_trains_every_other_round_in_the_reverse_order(dry_run):
    # On a shared VM a variant's time moves with the run before it: no variant may always follow the same one.
    order = {}
    for line in dry_run.stderr.splitlines():
        if line.startswith("round "):
            number, variant = line.removeprefix("round ").split(":")[0].split(", ")
            order.setdefault(int(number), []).append(variant)
    assert order[1][:3] == ["notebooks", "trl-defaults", "sftpipe"] and len(order[1]) >= 8
    assert order[2] == order[1][::-1] and order[3] == order[1]
