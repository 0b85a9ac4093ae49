"""LoRA training on SmolLM2-135M, the same Alpaca rows and steps, in one run: TRL's SFTTrainer as the
seed notebooks use it (fp32, pad = EOS, padded batches, full-sequence loss) vs sftpipe's training stage,
plus four ablations of ours (sdpa's dense packed mask instead of per-example attention; the stock
MLP instead of the lean SwiGLU; gradient checkpointing; glibc's malloc instead of the preloaded
allocator). Reports real (non-pad) tokens/s, achieved FLOP/s (4·N per token: frozen weights need
no weight gradient) against this machine's GEMM peak in the precision we train in, measured in the
same run, peak RSS of each run (each in its own process), and the completion loss of every adapter
on the same held-out rows. Writes JSON.

    .venv/bin/python bench/train_throughput.py [--rows 64] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = Path("results/models/base/smollm2-135m-instruct")
ALPACA = Path(__file__).resolve().parents[2] / "shared/data/alpaca/alpaca_5000.json"


def gemm_peak(dtype: torch.dtype, size: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    start = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    return 2 * size**3 * reps / (time.perf_counter() - start)


HELD_OUT = 32
VARIANTS = ("baseline", "sftpipe", "sftpipe-dense-attention", "sftpipe-stock-mlp", "sftpipe-gradient-checkpointing",
            "sftpipe-system-allocator")


def prepare(work: Path, rows: int) -> None:
    """Hydrate and tokenize Alpaca rows with sftpipe: the first `rows` to train both variants on, the
    next HELD_OUT to score them on."""
    from sftpipe.data import DatasetSpec, download_dataset, hydrate_dataset
    from sftpipe.io import read_jsonl, write_jsonl
    from sftpipe.tokenization import SPLITS, LengthSettings, SplitSettings, tokenize_and_split

    spec = DatasetSpec.from_config("alpaca", {"preset": "alpaca", "path": str(ALPACA), "limit": rows + HELD_OUT})
    download_dataset(spec, work / "raw.jsonl", work / "manifest.json", None)
    hydrate_dataset(spec, work / "raw.jsonl", work / "hydrated.jsonl")
    tokenize_and_split([work / "hydrated.jsonl"], MODEL, {s: work / f"all-{s}.jsonl" for s in SPLITS}, work / "stats.json",
                       LengthSettings(512), SplitSettings(0.0, 0.0, 0))
    tokenized = list(read_jsonl(work / "all-train.jsonl"))
    write_jsonl(work / "train.jsonl", tokenized[:rows])
    write_jsonl(work / "heldout.jsonl", tokenized[rows:])


def run_baseline(work: Path, steps: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from sftpipe.io import read_jsonl
    from sftpipe.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    tokenizer.pad_token = tokenizer.eos_token  # as the seeds do
    rows = [{"text": r["prompt"] + r["completion"]} for r in read_jsonl(work / "train.jsonl")]
    args = SFTConfig(output_dir=str(work / "baseline-out"), per_device_train_batch_size=8, max_steps=steps,
                     learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to="none", max_length=512,
                     use_cpu=True, disable_tqdm=True, seed=0,
                     # fp32 as the seeds ran it: TRL 1.x's SFTConfig turns bf16 on by default.
                     bf16=False)
    trainer = SFTTrainer(model=load_model(MODEL), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    result = trainer.train()
    trainer.model.save_pretrained(work / "baseline-adapter")
    tokens = int([h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h][-1])
    return {"seconds": result.metrics["train_runtime"], "real_tokens": tokens,
            "final_train_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]}


def run_sftpipe(work: Path, steps: int, variant: str) -> dict:
    import sftpipe.train
    from sftpipe.train import TrainJob, TrainSettings, train_lora

    if variant == "sftpipe-dense-attention":
        sftpipe.train.use_varlen_attention = lambda model: None
    if variant == "sftpipe-stock-mlp":
        sftpipe.train.use_lean_swiglu = lambda model: 0
    settings = TrainSettings(lora_r=8, lora_alpha=16, batch_size=8, max_steps=steps, learning_rate=2e-4,
                             logging_steps=1, eval_steps=10_000, save_steps=10_000,
                             gradient_checkpointing=variant == "sftpipe-gradient-checkpointing")
    # In this process (its allocator was preloaded by main, as `train` would): the ablations patch it.
    summary = train_lora(TrainJob(MODEL, work / "train.jsonl", work / "heldout.jsonl", work / f"{variant}-adapter",
                                  work / f"{variant}-history.json", work / "ckpt", settings))
    history = json.loads((work / f"{variant}-history.json").read_text())["log_history"]
    return {"seconds": summary["train_runtime_s"], "real_tokens": summary["train_tokens"],
            "final_train_loss": [h["loss"] for h in history if "loss" in h][-1], "precision": summary["precision"],
            "allocator": summary["allocator"]}


@torch.no_grad()
def completion_loss(adapter: Path, rows_path: Path) -> float:
    """Mean loss over completion tokens (EOS included) of held-out rows: the same yardstick for both."""
    from peft import PeftModel

    from sftpipe.io import read_jsonl
    from sftpipe.model import load_model

    model = PeftModel.from_pretrained(load_model(MODEL), adapter).eval()
    total, count = 0.0, 0
    for row in read_jsonl(rows_path):
        labels = torch.tensor([row["labels"]])
        loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + loss.item() * n, count + n
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench/results/train_throughput.json")
    args = parser.parse_args()
    if args.variant:  # a child process: one variant, so its peak RSS is its own
        if args.variant == "baseline":
            result = run_baseline(Path(args.work), args.steps)
        else:
            result = run_sftpipe(Path(args.work), args.steps, args.variant)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.rows)
        from sftpipe.train import resolve_precision

        precision = resolve_precision("auto")
        # Without native bf16 a bf16 GEMM runs in a slow fallback: not a peak worth quoting, and ours trains in fp32.
        peaks = {f"{p}_gflops": gemm_peak(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[p])) / 1e9
                 for p in ("fp32", "bf16") if p == "fp32" or precision == "bf16"}
        parameters = sum(p.numel() for p in __import__("sftpipe.model", fromlist=["load_model"]).load_model(MODEL).parameters())
        from sftpipe.train import allocator_library

        preload = allocator_library("auto")
        results = {}
        for variant in VARIANTS:
            env = dict(os.environ)
            if preload and variant not in ("baseline", "sftpipe-system-allocator"):
                env["LD_PRELOAD"] = preload
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--work", tmp, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True, env=env).stdout
            result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            result["real_tokens_per_s"] = result["real_tokens"] / result["seconds"]
            result["achieved_gflops"] = 4 * parameters * result["real_tokens_per_s"] / 1e9
            result["heldout_completion_loss"] = completion_loss(work / f"{variant}-adapter", work / "heldout.jsonl")
            results[variant] = result
    ours, base = results["sftpipe"], results["baseline"]
    report = {
        "benchmark": "LoRA SFT, SmolLM2-135M-Instruct, Alpaca rows, same steps",
        "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), None),
        "precision": precision,
        "rows": args.rows, "steps": args.steps, "batch_size": 8, "parameters": parameters,
        "gemm_peak": peaks, **results,
        "speedup_real_tokens_per_s": {v: r["real_tokens_per_s"] / base["real_tokens_per_s"] for v, r in results.items()},
        "sftpipe_fraction_of_peak": ours["achieved_gflops"] / peaks[f"{precision}_gflops"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
