"""`make gpu-check` (bench/gpu_check.py): on a machine without CUDA it says so and exits 0; its dry run
takes every step of the GPU check on CPU (LoRA and QLoRA training, two processes, merges, ARC-Easy)."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow
SCRIPT = [sys.executable, str(REPO / "bench" / "gpu_check.py")]


def test_without_cuda_the_check_says_so_and_succeeds(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    result = subprocess.run([*SCRIPT, "--out", str(tmp_path / "gpu")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "no CUDA GPU on this machine" in result.stdout
    assert not list(tmp_path.iterdir())


def test_the_dry_run_takes_every_step(tmp_path, shared_data):
    result = subprocess.run([*SCRIPT, "--dry-run", "--out", str(tmp_path / "gpu")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    runs = report["training"]
    assert set(runs) == {"lora", "qlora", "lora-2-processes"}
    assert all(run["steps"] == 2 for run in runs.values()) and runs["lora-2-processes"]["world_size"] == 2
    # The same global batch over two processes: the same examples, the same training loss.
    assert runs["lora-2-processes"]["train_loss"] == pytest.approx(runs["lora"]["train_loss"], rel=1e-5)
    assert set(report["arc_easy"]) == {"base", "lora merged", "qlora merged"}
    assert "cpu_flags" in report and (tmp_path / "gpu.md").read_text().startswith("# GPU check")
