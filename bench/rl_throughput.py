"""GRPO steps on one model, the same prompts, completions per prompt, lengths, reward, LoRA and
precision, in one run:

- `trl-as-shipped`: TRL's GRPOTrainer with its own defaults for everything the comparison does not fix
  (activation checkpointing on, its own prompt tokenization, generation through the PEFT model).
- `sftpipe`: sftpipe's RL stage (sftpipe.grpo): sampling from the plain copy of the policy (sftpipe.grpo.PolicySampler),
  no activation checkpointing, prompts tokenized as SFT tokenized them.
- `sftpipe-trl-generation`: ours, sampling through the PEFT model as TRL does (the plain copy off).
- `sftpipe-prompts-per-row`: ours, the loss computing every row's prompt again and projecting every
  position, as TRL does off CUDA (each group's prompt computed once off).

Fixed for all: the model (the demo's merged SFT model where `make demo` made it), the first prompts
of the demo's training split, `num_generations` completions for each of `prompts_per_step` prompts
per step, at most `max_completion_length` new tokens at temperature 1, exact-match reward, beta 0,
loss dapo, LoRA r 16 / alpha 32 on all linear layers, learning rate 1e-5, constant schedule, the
precision given (fp32 by default). Each variant runs in a process of its own, on its allocator
(`ALLOCATORS`: TRL on glibc's malloc as its users run it, ours on what the RL job preloads, tcmalloc
where installed). The first step is a warm-up, left out of the figures. Reported per variant:
seconds per step, completions per second, the share of a step spent generating, the mean reward,
the allocator; and the host's load average before and after, since other jobs share these cores.
Writes JSON.

    .venv/bin/python bench/rl_throughput.py [--steps 5] [--model DIR] [--prompts train.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import host_info, smollm2

DEMO = Path("results")
SETUP = {"num_generations": 8, "prompts_per_step": 2, "max_completion_length": 16, "lora_r": 16, "learning_rate": 1e-5}
# Each variant's allocator: TRL's as its users run it, ours as sftpipe.launch runs the RL job.
ALLOCATORS = {"trl-as-shipped": "system", "sftpipe": "auto", "sftpipe-trl-generation": "auto", "sftpipe-prompts-per-row": "auto"}


def timed(trainer) -> dict:
    """Step and generation seconds of `trainer`, measured the same way for every variant: a step from
    its callback's begin to end, generation as the trainer's own `_generate_single_turn` call."""
    from transformers import TrainerCallback

    times = {"steps": [], "generation": []}
    generate = trainer._generate_single_turn

    def generation(*args, **kwargs):
        start = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            times["generation"].append(time.perf_counter() - start)

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times["steps"].append(time.perf_counter() - self.start)

    trainer._generate_single_turn = generation
    trainer.add_callback(Steps())
    return times


def figures(times: dict, trainer) -> dict:
    steps, generation = times["steps"][1:], times["generation"][1:]  # the first step warms up
    completions = SETUP["num_generations"] * SETUP["prompts_per_step"]
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {
        "steps_timed": len(steps),
        "seconds_per_step": sum(steps) / len(steps),
        "completions_per_s": completions * len(steps) / sum(steps),
        "generation_share": sum(generation) / sum(steps),
        "generation_seconds_per_step": sum(generation) / len(generation),
        "mean_reward": sum(rewards) / len(rewards) if rewards else None,
        "step_seconds": [round(s, 2) for s in times["steps"]],
    }


def trl_as_shipped(model_dir: Path, prompts: Path, out: Path, steps: int, precision: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from sftpipe.rewards import trl_reward_functions
    from sftpipe.rl_settings import RewardSpec

    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    args = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=SETUP["num_generations"] * SETUP["prompts_per_step"],
        num_generations=SETUP["num_generations"],
        max_completion_length=SETUP["max_completion_length"],
        temperature=1.0,
        beta=0.0,
        loss_type="dapo",
        learning_rate=SETUP["learning_rate"],
        lr_scheduler_type="constant",
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
        reward_funcs=trl_reward_functions([RewardSpec("exact")]),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(
            r=SETUP["lora_r"], lora_alpha=2 * SETUP["lora_r"], target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    times = timed(trainer)
    trainer.train()
    return {**figures(times, trainer), "activation_checkpointing": args.gradient_checkpointing}


def sftpipe(model_dir: Path, prompts: Path, out: Path, steps: int, precision: str, plain_copy: bool, share_prompts: bool) -> dict:
    from sftpipe.grpo import RLJob, RLRecipe
    from sftpipe.rl_settings import RewardSpec, RLSettings
    from sftpipe.train import TrainSettings

    settings = TrainSettings(
        lora_r=SETUP["lora_r"],
        lora_alpha=2 * SETUP["lora_r"],
        learning_rate=SETUP["learning_rate"],
        lr_scheduler="constant",
        warmup_ratio=0.0,
        max_steps=steps,
        logging_steps=1,
        save_steps=10 * steps,
        precision=precision,
    )
    rl = RLSettings(
        num_generations=SETUP["num_generations"],
        prompts_per_step=SETUP["prompts_per_step"],
        max_completion_length=SETUP["max_completion_length"],
        rewards=(RewardSpec("exact"),),
    )
    recipe = RLRecipe(RLJob(model_dir, prompts, out / "adapter", out / "history.json", out / "work", settings, rl))
    recipe.setup()
    if not plain_copy:
        recipe.trainer.generator = None
    recipe.trainer.share_prompts = share_prompts
    times = timed(recipe.trainer)
    recipe.trainer.train()
    return {**figures(times, recipe.trainer), "activation_checkpointing": recipe.trainer.args.gradient_checkpointing}


def run_variant(name: str, model: Path, prompts: Path, out: Path, steps: int, precision: str) -> dict:
    """One variant in a process of its own, on its allocator (ALLOCATORS) preloaded as sftpipe.launch
    would preload it."""
    from sftpipe.execution import planned_allocator

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload := planned_allocator(ALLOCATORS[name])[2]:
        env["LD_PRELOAD"] = preload
    command = [sys.executable, __file__, "--variant", name, "--model", str(model), "--prompts", str(prompts)]
    command += ["--steps", str(steps), "--precision", precision, "--work", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise SystemExit(f"{name}: {(run.stderr.strip().splitlines() or [f'exit status {run.returncode}'])[-1]}")
    return json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])


def variant(args) -> None:
    """The child's part: one variant on the prepared prompts, its figures printed as a RESULT line."""
    from sftpipe.execution import current_allocator

    torch.set_num_threads(os.cpu_count() or 1)
    run = (args.model, args.prompts, args.work, args.steps, args.precision)
    runs = {
        "trl-as-shipped": lambda: trl_as_shipped(*run),
        "sftpipe": lambda: sftpipe(*run, plain_copy=True, share_prompts=True),
        "sftpipe-trl-generation": lambda: sftpipe(*run, plain_copy=False, share_prompts=True),
        "sftpipe-prompts-per-row": lambda: sftpipe(*run, plain_copy=True, share_prompts=False),
    }
    print("RESULT " + json.dumps({**runs[args.variant](), "allocator": current_allocator()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=64, help="prompts taken from the training split")
    parser.add_argument("--model", type=Path, default=DEMO / "models/merged/demo")
    parser.add_argument("--prompts", type=Path, default=DEMO / "data/tokenized/demo/train.jsonl")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--out", type=Path, default=Path("bench/results/rl_throughput.json"))
    parser.add_argument("--variant", choices=tuple(ALLOCATORS), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return variant(args)
    from sftpipe.rl_prompts import write_rl_prompts

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        model = args.model if args.model.exists() else smollm2(scratch)
        train = scratch / "train.jsonl"
        train.write_text("".join(args.prompts.read_text().splitlines(keepends=True)[: args.rows]))
        prompts = scratch / "prompts.jsonl"
        write_rl_prompts(
            train, sorted({json.loads(line)["dataset"] for line in train.read_text().splitlines()}), prompts, scratch / "p.json"
        )
        load_before = os.getloadavg()
        variants = {}
        for name in ALLOCATORS:
            variants[name] = run_variant(name, model, prompts, scratch / name, args.steps, args.precision)
            print(name, json.dumps(variants[name]), file=sys.stderr)
        load_after = os.getloadavg()
    ours, theirs = variants["sftpipe"], variants["trl-as-shipped"]
    result = {
        "host": host_info(),
        "load_average_1_5_15": {"before": load_before, "after": load_after},
        "model": str(model),
        "setup": {
            **SETUP,
            "precision": args.precision,
            "steps": args.steps,
            "prompts": args.rows,
            "threads": os.cpu_count(),
        },
        "variants": variants,
        "speedup_over_trl": theirs["seconds_per_step"] / ours["seconds_per_step"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "host"}, indent=2))


if __name__ == "__main__":
    main()
