"""Per-rank memory of LoRA training under DDP and under FSDP, 2 gloo processes on CPU, SmolLM2-135M:
the bytes each rank holds of parameters, gradients and optimizer state, read from the tensors during
the first step (a DTensor counts its local shard), and each rank's peak RSS. Same rows, settings and
precision for both strategies, in one run. Writes JSON.

    .venv/bin/python bench/fsdp_memory.py [--precision fp32] [--rows 32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import host_info, smollm2

ALPACA = Path(__file__).resolve().parents[2] / "shared/data/alpaca/alpaca_5000.json"
STRATEGIES = ("ddp", "fsdp")


def child(job_path: Path, out: Path) -> None:
    """One rank under torchrun: two steps of the training stage, its holdings in the first."""
    from transformers import TrainerCallback

    from sftpipe.fsdp import holdings
    from sftpipe.train import LoraRecipe, TrainJob

    class Holdings(TrainerCallback):
        seen = None

        def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.seen = self.seen or holdings(model, optimizer)

    recipe = LoraRecipe(TrainJob.from_json(job_path.read_text()))
    probe = Holdings()
    callbacks = recipe.callbacks
    recipe.callbacks = lambda: [*callbacks(), probe]
    recipe.setup()
    recipe.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps({**probe.seen, "peak_rss_mb": peak}))


def prepare(work: Path, model: Path, rows: int, precision: str) -> Path:
    from sftpipe.splits import SplitSettings
    from sftpipe.tokenization import LengthSettings, tokenize_and_split
    from sftpipe.train import TrainJob, TrainSettings

    alpaca = json.loads(ALPACA.read_text())[:rows]
    hydrated = work / "rows.jsonl"
    hydrated.write_text(
        "".join(
            json.dumps({"id": f"a{i}", "dataset": "alpaca", "prompt": r["instruction"] + "\n", "completion": r["output"]}) + "\n"
            for i, r in enumerate(alpaca)
        )
    )
    paths = {split: work / f"{split}.jsonl" for split in ("train", "validation", "test")}
    tokenize_and_split([hydrated], model, paths, work / "stats.json", LengthSettings(256), SplitSettings(0.0, 0.0, 0))
    settings = TrainSettings(max_steps=2, batch_size=4, logging_steps=1, eval_steps=100, save_steps=100, precision=precision)
    job = TrainJob(model, paths["train"], paths["validation"], work / "adapter", work / "h.json", work / "ckpt", settings)
    (work / "job.json").write_text(job.to_json())
    return work / "job.json"


def run(strategy: str, job_path: Path, work: Path) -> list[dict]:
    out = work / strategy
    out.mkdir()
    shutil.rmtree(work / "ckpt", ignore_errors=True)  # the other strategy's checkpoints: no resume
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SFTPIPE_STRATEGY": strategy}
    subprocess.run([*command, "--child", str(job_path), str(out)], check=True, env=env)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--out", default="bench/results/fsdp_memory.json")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = smollm2(work)
        job_path = prepare(work, model, args.rows, args.precision)
        ranks = {strategy: run(strategy, job_path, work) for strategy in STRATEGIES}
    megabytes = {s: [{k: v / 2**20 if k != "peak_rss_mb" else v for k, v in r.items()} for r in rs] for s, rs in ranks.items()}
    report = {
        "benchmark": "per-rank memory of LoRA training, DDP vs FSDP, 2 gloo processes, SmolLM2-135M-Instruct",
        "date": time.strftime("%Y-%m-%d"),
        **host_info(),
        "precision": args.precision,
        "rows": args.rows,
        "what": "MB each rank holds of parameters, gradients and optimizer state in the first step (a DTensor's local "
        "shard), and each rank's peak RSS; LoRA: the frozen base is most of the parameters, the gradients and the "
        "optimizer state are the adapter's",
        "per_rank_mb": megabytes,
        "fsdp_over_ddp": {
            key: megabytes["fsdp"][0][key] / megabytes["ddp"][0][key]
            for key in ("parameters", "gradients", "optimizer_state", "peak_rss_mb")
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
