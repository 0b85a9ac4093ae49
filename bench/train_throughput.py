"""LoRA training on SmolLM2-135M, the same Alpaca rows, steps and hyperparameters, in one run:

- `notebooks`: TRL's SFTTrainer the way the reference notebooks use it: fp32, pad = EOS, padded
  batches, loss on the whole sequence, no gradient checkpointing, glibc's malloc.
- `trl-defaults`: TRL's SFTTrainer as shipped: its own defaults (activation checkpointing on,
  padded batches, the tokenizer's own pad token), with bf16 where this CPU runs it natively (TRL
  turns bf16 on everywhere; on a CPU without native bf16 it is an emulation, which no user keeps).
- `sftpipe`: sftpipe's training stage with its defaults (padding-free batches with per-example
  attention (eager on CPU), loss on completion positions only, fused loss, lean SwiGLU, fused RMSNorm and RoPE,
  fused LoRA layers, shared LoRA inputs, tcmalloc), in the precision `auto` picks here.
- ablations of ours, each a setting of the training stage that undoes one of those choices;
  `sftpipe-fp32` trains in fp32, the precision an fp32-only host's `auto` picks.

Every variant trains with the same LoRA (r 8, alpha 16, all linear layers, no dropout), batch size,
learning rate and linear schedule without warmup, on the same rows, and none evaluates while it
trains (sftpipe's variants get no validation rows, as TRL's get no eval set). What still differs is listed
per variant in the JSON (`setup`).

Reported per variant: real (non-pad) tokens/s; FLOP/s counted as computed: 4·N_body per computed
position (forward, and the input gradient the frozen weights pass back; no weight gradient), 6·N_lora
per computed position for the LoRA factors, 4·N_head per position projected onto the vocabulary,
and one more forward (2·N_body + 2·N_lora) under checkpointing; attention scores are not counted,
for any variant. Computed positions include padding. Each FLOP/s is set against this machine's GEMM
peak in the variant's precision, measured in the same run; peak RSS of each variant's own process;
the completion loss of every adapter on the same held-out rows. Each variant trains once per round
(`--rounds`, 2), every variant in turn; its fastest round is reported, every round's seconds listed.
Writes JSON.

    .venv/bin/python bench/train_throughput.py [--rows 64] [--steps 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from common import host_info, smollm2

ALPACA = Path(__file__).resolve().parents[2] / "shared/data/alpaca/alpaca_5000.json"
HELD_OUT = 32
HYPERPARAMETERS = {
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "batch_size": 8,
    "learning_rate": 2e-4,
    "lr_scheduler": "linear",
    "warmup_ratio": 0.0,
}

# Our ablations: (setting overrides, allocator, what the variant undoes).
ABLATIONS = {
    "sftpipe": ({}, "auto", "nothing: sftpipe's defaults"),
    "sftpipe-dense-attention": (
        {"attention": "sdpa"},
        "auto",
        "per-example attention: sdpa with a dense mask over the packed row",
    ),
    "sftpipe-sdpa-per-example": (
        {"attention": "varlen_sdpa"},
        "auto",
        "eager per-example attention on CPU: one sdpa call (its flash kernel) per example",
    ),
    "sftpipe-stock-mlp": ({"lean_swiglu": False}, "auto", "the lean SwiGLU MLP"),
    "sftpipe-stock-rmsnorm": ({"fused_rmsnorm": False}, "auto", "the RMSNorm that keeps its bf16 input, not an fp32 copy"),
    "sftpipe-stock-rope": ({"fused_rope": False}, "auto", "the one-pass RoPE backward"),
    "sftpipe-peft-lora": ({"fused_lora": False}, "auto", "the fused LoRA layer: peft's forward, five autograd steps"),
    "sftpipe-copied-lora-inputs": (
        {"fused_lora": False, "lean_lora": False},
        "auto",
        "the fused LoRA layer and, in peft's forward, shared LoRA inputs: peft's fp32 copy of each layer's input, cast back",
    ),
    "sftpipe-logits-loss": ({"fused_loss": False}, "auto", "the fused loss: logits of the completion positions kept"),
    "sftpipe-system-allocator": ({}, "system", "tcmalloc: glibc's malloc"),
    "sftpipe-gradient-checkpointing": ({"gradient_checkpointing": True}, "auto", "no checkpointing: activations recomputed"),
    # Where `auto` picks bf16, the stage's fp32 figures beside them (an fp32-only host trains so by default).
    "sftpipe-fp32": ({"precision": "fp32"}, "auto", "precision auto: fp32 throughout"),
    # fp32 keeps twice the bytes for backward: the setting that holds it under the memory bound.
    "sftpipe-fp32-gradient-checkpointing": (
        {"precision": "fp32", "gradient_checkpointing": True},
        "auto",
        "precision auto and no checkpointing: fp32 throughout, activations recomputed",
    ),
}
VARIANTS = ("notebooks", "trl-defaults", *ABLATIONS)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# How the run measures, written into its JSON.
METHOD = {
    "timing": "each variant's fastest of its rounds (all in `seconds_each_round`); every round trains every "
    "variant in turn, since on a shared VM the same variant's time moves with its place in the sequence of runs, "
    "and every other round in the reverse order, so that no variant always follows the same one",
    "evaluation_while_training": "none, for every variant: the held-out rows are scored after training",
    "model_gemm_rate": "each variant's `model_gemm_gflops`: the rate of the matrix products its mean step computes "
    "(sequence positions x the model's linear shapes, LoRA factors, the head unchunked), each timed alone for 1 s; "
    "measured once for the variants whose steps compute the same products",
    "flop_counting": "4·N_body + 6·N_lora per computed position (+2·N_body + 2·N_lora under checkpointing), "
    "4·N_head per projected position; attention scores not counted",
}


def seconds_per_product(m: int, k: int, n: int, dtype: torch.dtype, budget: float) -> float:
    """Wall seconds of one [m, k] x [k, n] product in `dtype`, repeated for `budget` seconds (3 at least)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    torch.mm(a, b)
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < budget:
        torch.mm(a, b)
        reps += 1
    return (time.perf_counter() - start) / reps


def gemm_peak(dtype: torch.dtype, seconds: float = 2.0) -> float:
    """FLOP/s of square matrix products in `dtype`, repeated for `seconds`: 2048-wide, or 512-wide
    where the type runs 100x slower than fp32 (bf16 emulated on a CPU without native bf16)."""

    def rate(size: int, budget: float) -> float:
        return 2 * size**3 / seconds_per_product(size, size, size, dtype, budget)

    return rate(2048 if rate(512, 0.0) > 20e9 else 512, seconds)


def step_products(counts: dict, tokens: int, projected: int) -> tuple[tuple[tuple[int, int, int], int], ...]:
    """The matrix products (m, k, n) one LoRA training step computes, at the model's own shapes, with
    how often each occurs, in order (a key for `model_gemm_rate`'s cache): for every decoder linear
    layer the forward and the input gradient of the frozen weight, and the LoRA factors' forward,
    input and weight gradients; the output projection of the projected positions, forward and input
    gradient, unchunked. The same products the FLOP count counts, so their rate is the rate the step
    would reach if it did nothing else."""
    products: dict[tuple[int, int, int], int] = {}
    r = HYPERPARAMETERS["lora_r"]
    for (fan_in, fan_out), layers in counts["linear_shapes"].items():
        for shape in (
            (tokens, fan_in, fan_out),
            (tokens, fan_out, fan_in),
            (tokens, fan_in, r),
            (tokens, r, fan_out),
            (tokens, fan_out, r),
            (tokens, r, fan_in),
            (fan_in, tokens, r),
            (r, tokens, fan_out),
        ):
            products[shape] = products.get(shape, 0) + layers
    hidden, vocabulary = counts["head_shape"]
    for shape in ((projected, hidden, vocabulary), (projected, vocabulary, hidden)):
        products[shape] = products.get(shape, 0) + 1
    return tuple(sorted(products.items()))


@functools.cache
def model_gemm_rate(products: tuple[tuple[tuple[int, int, int], int], ...], dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOP/s of `products` ((m, k, n), times) in `dtype`: each product timed alone for `seconds`,
    weighted by how often a step computes it. Measured once per set of products: variants whose steps
    compute the same products share one measurement, so their shares of it differ by their own times."""
    flops = elapsed = 0.0
    for (m, k, n), times in products:
        elapsed += times * seconds_per_product(m, k, n, dtype, seconds)
        flops += times * 2 * m * k * n
    return flops / elapsed


def prepare(work: Path, model: Path, rows: int) -> None:
    """Hydrate and tokenize Alpaca rows with sftpipe: the first `rows` to train every variant on, the
    next HELD_OUT to score them on."""
    from sftpipe.data import DatasetSpec, download_dataset, hydrate_dataset
    from sftpipe.io import read_jsonl, write_jsonl
    from sftpipe.splits import SplitSettings
    from sftpipe.tokenization import SPLITS, LengthSettings, tokenize_and_split

    spec = DatasetSpec.from_config("alpaca", {"preset": "alpaca", "path": str(ALPACA), "limit": rows + HELD_OUT})
    download_dataset(spec, work / "raw.jsonl", work / "manifest.json", None)
    hydrate_dataset(spec, work / "raw.jsonl", work / "hydrated.jsonl")
    tokenize_and_split(
        [work / "hydrated.jsonl"],
        model,
        {s: work / f"all-{s}.jsonl" for s in SPLITS},
        work / "stats.json",
        LengthSettings(512),
        SplitSettings(0.0, 0.0, 0),
    )
    tokenized = list(read_jsonl(work / "all-train.jsonl"))
    write_jsonl(work / "train.jsonl", tokenized[:rows])
    write_jsonl(work / "heldout.jsonl", tokenized[rows:])
    write_jsonl(work / "no-validation.jsonl", [])


def trl_arguments(work: Path, variant: str, native_bf16: bool, steps: int = 8):
    """The SFTConfig of a TRL baseline. transformers refuses bf16 on a CPU unless told the run is on
    the CPU (`use_cpu`), which a user on a CPU sets."""
    from trl import SFTConfig

    common = dict(
        output_dir=str(work / f"{variant}-out"),
        per_device_train_batch_size=HYPERPARAMETERS["batch_size"],
        max_steps=steps,
        learning_rate=HYPERPARAMETERS["learning_rate"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        use_cpu=not torch.cuda.is_available(),
    )
    if variant == "notebooks":
        return SFTConfig(**common, max_length=512, bf16=False, activation_checkpointing=False)
    return SFTConfig(**common, **({} if native_bf16 else {"bf16": False}))


def run_trl(work: Path, model: Path, steps: int, variant: str, native_bf16: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTTrainer

    from sftpipe.io import read_jsonl
    from sftpipe.model import load_model, load_tokenizer

    class CountingSFTTrainer(SFTTrainer):
        """TRL's trainer, unchanged, counting the positions it computes: every position of the padded
        batch runs through the model, and on CPU TRL's fused head scores every one of them."""

        positions = projected = 0

        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                self.positions += inputs["input_ids"].numel()
                self.projected += inputs["input_ids"].shape[0] * (inputs["input_ids"].shape[1] - 1)
            return super().compute_loss(model, inputs, *args, **kwargs)

    tokenizer = load_tokenizer(model)
    args = trl_arguments(work, variant, native_bf16, steps)
    if variant == "notebooks":
        tokenizer.pad_token = tokenizer.eos_token
    rows = [{"text": r["prompt"] + r["completion"]} for r in read_jsonl(work / "train.jsonl")]
    lora = LoraConfig(
        r=HYPERPARAMETERS["lora_r"],
        lora_alpha=HYPERPARAMETERS["lora_alpha"],
        lora_dropout=HYPERPARAMETERS["lora_dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = CountingSFTTrainer(
        model=load_model(model), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora
    )
    result = trainer.train()
    trainer.model.save_pretrained(work / f"{variant}-adapter")
    history = trainer.state.log_history
    return {
        "seconds": result.metrics["train_runtime"],
        "real_tokens": int([h["num_tokens"] for h in history if "num_tokens" in h][-1]),
        "computed_positions": trainer.positions,
        "projected_positions": trainer.projected,
        "final_train_loss": [h["loss"] for h in history if "loss" in h][-1],
        "setup": {
            "precision": "bf16" if args.bf16 else "fp32",
            "gradient_checkpointing": bool(args.activation_checkpointing),
            "batches": "padded" + ("" if args.padding_free else ", not padding-free"),
            "pad_token": "EOS" if tokenizer.pad_token_id == tokenizer.eos_token_id else tokenizer.pad_token,
            "loss_positions": "the whole sequence (prompt and completion)",
            "attention": "sdpa with the padding mask",
            "allocator": "system (glibc)",
        },
    }


def _mb(storages: dict[int, int]) -> float:
    return sum(storages.values()) / 2**20


def memory_profile(job, libraries_mb: float) -> dict[str, float]:
    """MB each component holds at the run's largest batch: the process before the model loads
    (interpreter and libraries), the frozen weights, the LoRA factors with their gradients and AdamW's
    two moments, and the activations the loss's graph keeps for backward (distinct storages, weights
    aside), from one forward as the Trainer runs it (autocast in its precision). What the peak RSS
    holds beyond these is the allocator's (freed memory it keeps) and the step's transient buffers."""
    from sftpipe.precision import COMPUTE_DTYPES
    from sftpipe.train import LoraRecipe

    recipe = LoraRecipe(job)
    recipe.setup()
    trainer, model = recipe.trainer, recipe.trainer.model
    params = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    factors = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters() if p.requires_grad}
    largest = max(trainer.get_train_dataloader(), key=lambda batch: batch["input_ids"].numel())
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with (
        torch.autocast("cpu", dtype=COMPUTE_DTYPES[recipe.precision], enabled=recipe.precision != "fp32"),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
    ):
        trainer.compute_loss(model, largest)
    return {
        "libraries_mb": libraries_mb,
        "frozen_weights_mb": _mb(params) - _mb(factors),
        "lora_factors_mb": _mb(factors),
        "gradients_mb": _mb(factors),
        "optimizer_state_mb": 2 * _mb(factors),
        "kept_for_backward_mb": _mb(kept),
        "largest_batch_tokens": int(largest["input_ids"].numel()),
    }


def run_sftpipe(work: Path, model: Path, steps: int, variant: str) -> dict:
    from sftpipe.execution import current_allocator
    from sftpipe.train import TrainJob, TrainSettings, train_lora

    for library in ("datasets", "peft", "transformers", "trl"):  # what the stage imports before it loads a model
        importlib.import_module(library)
    libraries_mb = rss_mb()
    overrides, _, _ = ABLATIONS[variant]
    settings = TrainSettings(
        **HYPERPARAMETERS, max_steps=steps, logging_steps=1, eval_steps=10_000, save_steps=10_000, **overrides
    )
    job = TrainJob(
        model,
        work / "train.jsonl",
        work / "no-validation.jsonl",  # as TRL's variants, which have no eval set: no evaluation in the timed run
        work / f"{variant}-adapter",
        work / f"{variant}-history.json",
        work / "ckpt",
        settings,
    )
    summary = train_lora(job)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # The profile's forward keeps what a step without checkpointing keeps (the Trainer switches it on).
    profile = None if settings.gradient_checkpointing else memory_profile(job, libraries_mb)
    if profile:
        profile["beyond_these_at_the_peak_mb"] = peak_mb - sum(v for k, v in profile.items() if k.endswith("_mb"))
    history = json.loads((work / f"{variant}-history.json").read_text())["log_history"]
    return {
        "seconds": summary.train_runtime_s,
        "real_tokens": summary.train_tokens,
        "computed_positions": summary.train_tokens,  # padding-free: no pad position is computed
        "projected_positions": summary.projected_positions,
        "final_train_loss": [h["loss"] for h in history if "loss" in h][-1],
        "evaluations_while_training": sum("eval_loss" in h for h in history),
        "memory_profile": profile,
        "peak_rss_mb": peak_mb,  # of the training, before the profile loads the model again
        "setup": {
            "precision": summary.precision,
            "gradient_checkpointing": settings.gradient_checkpointing,
            "batches": "padding-free" if settings.padding_free else "padded",
            "pad_token": "none in the batches (padding-free)",
            "loss_positions": "completion positions only",
            "attention": summary.attention,
            "lean_swiglu": settings.lean_swiglu and not settings.gradient_checkpointing,
            "fused_loss": settings.fused_loss,
            "allocator": current_allocator(),
            "settings": asdict(settings),
        },
    }


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def parameter_counts(model_dir: Path) -> dict[str, int]:
    """N_body (the decoder's linear weights), N_head (the output projection) and N_lora (the LoRA
    factors of every linear layer of the decoder, at the bench's rank); the decoder's linear shapes
    (fan in, fan out: how many layers) and the head's (hidden, vocabulary)."""
    from sftpipe.model import load_model

    model = load_model(model_dir)
    body = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")]
    r = HYPERPARAMETERS["lora_r"]
    shapes: dict[tuple[int, int], int] = {}
    for m in body:
        shapes[(m.in_features, m.out_features)] = shapes.get((m.in_features, m.out_features), 0) + 1
    head = model.get_output_embeddings().weight
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "body_linear": sum(m.weight.numel() for m in body),
        "head": head.numel(),
        "lora": sum(r * (m.in_features + m.out_features) for m in body),
        "linear_shapes": shapes,
        "head_shape": (head.shape[1], head.shape[0]),
    }


def computed_flops(result: dict, counts: dict[str, int]) -> float:
    """FLOPs the variant computed in training (see the module docstring)."""
    positions = result["computed_positions"]
    per_position = 4 * counts["body_linear"] + 6 * counts["lora"]
    if result["setup"]["gradient_checkpointing"]:
        per_position += 2 * counts["body_linear"] + 2 * counts["lora"]
    return per_position * positions + 4 * counts["head"] * result["projected_positions"]


@torch.no_grad()
def completion_loss(model_dir: Path, adapter: Path, rows_path: Path) -> float:
    """Mean loss over completion tokens (EOS included) of held-out rows: the same yardstick for all."""
    from peft import PeftModel

    from sftpipe.io import read_jsonl
    from sftpipe.model import load_model

    model = PeftModel.from_pretrained(load_model(model_dir), adapter).eval()
    total, count = 0.0, 0
    for row in read_jsonl(rows_path):
        labels = torch.tensor([row["labels"]])
        loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + loss.item() * n, count + n
    return total / count


def train_variant(variant: str, work: Path, model: Path, steps: int) -> dict | str:
    """One variant trained in a process of its own, so its peak RSS is its own; or, where it cannot
    run, the last line it printed."""
    from sftpipe.execution import planned_allocator

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    # As `sftpipe.launch` would: the variant's allocator preloaded into its process.
    preload = planned_allocator(ABLATIONS[variant][1])[2] if variant in ABLATIONS else None
    if preload:
        env["LD_PRELOAD"] = preload
    command = [sys.executable, __file__, "--variant", variant, "--work", str(work), "--model", str(model), "--steps", str(steps)]
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        return (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1]
    return json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])


def train_in_rounds(variants: list[str], count: int, train: Callable[[str], dict | str], failed: dict) -> dict:
    """Each variant's rounds, `train(variant)` round by round so that each variant trains at several
    points of the sequence of runs, every other round in the reverse order; a variant that cannot run
    goes into `failed` and trains no more."""
    rounds = {variant: [] for variant in variants}
    for number in range(count):
        for variant in (v for v in (variants if number % 2 == 0 else variants[::-1]) if v not in failed):
            result = train(variant)
            if isinstance(result, str):
                failed[variant] = result
                print(f"{variant}: could not run: {result}", file=sys.stderr)
                continue
            rounds[variant].append(result)
            print(f"round {number + 1}, {variant}: {result['seconds']:.1f} s", file=sys.stderr)
    return {variant: runs for variant, runs in rounds.items() if variant not in failed}


def measured(variant: str, rounds: list[dict], work: Path, model: Path, steps: int, counts: dict, peaks: dict) -> dict:
    """A variant's fastest round, with every round's seconds and the highest peak RSS of them, its rates
    and the held-out loss of its adapter (every round trains the same one)."""
    result = min(rounds, key=lambda r: r["seconds"])
    result["seconds_each_round"] = [r["seconds"] for r in rounds]
    result["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rounds)
    if variant in ABLATIONS:
        result["setup"]["undoes"] = ABLATIONS[variant][2]
    result["real_tokens_per_s"] = result["real_tokens"] / result["seconds"]
    result["computed_gflops"] = computed_flops(result, counts) / result["seconds"] / 1e9
    result["fraction_of_gemm_peak"] = result["computed_gflops"] / peaks[result["setup"]["precision"]]
    per_step = [round(result[key] / steps) for key in ("computed_positions", "projected_positions")]
    rate = model_gemm_rate(step_products(counts, *per_step), DTYPES[result["setup"]["precision"]])
    result["model_gemm_gflops"] = rate / 1e9
    result["fraction_of_model_gemm_rate"] = result["computed_gflops"] / result["model_gemm_gflops"]
    result["heldout_completion_loss"] = completion_loss(model, work / f"{variant}-adapter", work / "heldout.jsonl")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="times each variant trains; its fastest is reported")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench/results/train_throughput.json")
    parser.add_argument(
        "--dry-run", action="store_true", help="build every variant's training arguments, in both precisions, and train none"
    )
    args = parser.parse_args()
    from sftpipe.precision import resolve_precision

    native_bf16 = resolve_precision("auto") == "bf16"
    if args.dry_run:
        dry_run(args.variants, args.rounds)
        return
    if args.variant:  # a child process: one variant, so its peak RSS is its own
        if args.variant in ABLATIONS:
            result = run_sftpipe(Path(args.work), Path(args.model), args.steps, args.variant)
        else:
            result = run_trl(Path(args.work), Path(args.model), args.steps, args.variant, native_bf16)
        result.setdefault("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print("RESULT " + json.dumps(result))
        return

    peaks = {"fp32": gemm_peak(torch.float32) / 1e9, "bf16": gemm_peak(torch.bfloat16) / 1e9}
    results, failed = {}, {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = smollm2(work)
        counts = parameter_counts(model)
        prepare(work, model, args.rows)
        train = functools.partial(train_variant, work=work, model=model, steps=args.steps)
        rounds = train_in_rounds(args.variants, args.rounds, train, failed)
        for variant in rounds:
            result = results[variant] = measured(variant, rounds[variant], work, model, args.steps, counts, peaks)
            print(
                f"{variant}: {result['real_tokens_per_s']:.1f} real tokens/s, {result['computed_gflops']:.1f} GFLOP/s, "
                f"peak RSS {result['peak_rss_mb']:.0f} MB",
                file=sys.stderr,
            )
    baselines = [b for b in ("notebooks", "trl-defaults") if b in results]
    report = {
        "benchmark": "LoRA SFT, SmolLM2-135M-Instruct, Alpaca rows, same steps and hyperparameters",
        "date": time.strftime("%Y-%m-%d"),
        **host_info(),
        "native_bf16": native_bf16,
        # Other work on the cores slows every variant; the ratios of one run still compare like with like.
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "rows": args.rows,
        "steps": args.steps,
        "rounds": args.rounds,
        "heldout_rows": HELD_OUT,
        "hyperparameters": HYPERPARAMETERS,
        "parameters": {key: value for key, value in counts.items() if isinstance(value, int)},
        "linear_shapes": [[*shape, layers] for shape, layers in counts["linear_shapes"].items()],
        "gemm_peak_gflops": peaks,
        **METHOD,
        "variants": results,
        "failed": failed,
        "speedup_real_tokens_per_s": {
            f"vs {b}": {v: r["real_tokens_per_s"] / results[b]["real_tokens_per_s"] for v, r in results.items()}
            for b in baselines
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if failed:
        sys.exit(f"{len(failed)} variants could not run: {', '.join(failed)} (the JSON says why)")


def dry_run(variants: list[str], rounds: int) -> None:
    """Each TRL baseline's arguments as a native-bf16 host and as an fp32-only host builds them (which
    transformers checks on construction), each of our variants' settings and the order of the rounds; no training."""
    from sftpipe.train import TrainSettings

    train_in_rounds(variants, rounds, lambda variant: {"seconds": 0.0}, {})  # the order each round trains in
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            if variant in ABLATIONS:
                settings = TrainSettings(**HYPERPARAMETERS, **ABLATIONS[variant][0])
                print(f"{variant}: precision {settings.precision}, allocator {ABLATIONS[variant][1]}")
                continue
            for native in (True, False):
                built = trl_arguments(Path(tmp), variant, native)
                print(f"{variant} (native bf16 {native}): bf16 {built.bf16}, use_cpu {built.use_cpu}")


if __name__ == "__main__":
    main()
