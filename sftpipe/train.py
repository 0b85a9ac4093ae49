"""Train stage: LoRA supervised fine-tuning with peft + TRL, as a recipe of named steps
(`setup_model`, `setup_data`, `setup_trainer`, `train`, `save`) run by `train_lora`.

`sftpipe.launch` decides the processes it runs in; `sftpipe.loss`, `sftpipe.attention` and
`sftpipe.swiglu` hold the pieces of a training step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import types
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .artifacts import TrainSummary, write_history
from .attention import use_attention
from .execution import STRATEGY_VARIABLE, current_allocator
from .fsdp import fsdp_arguments, gathered_state, shard_where_accelerate_does_not, sharding_check
from .io import PipelineError, Progress, read_json, read_jsonl, sha256_file
from .jobs import TrainJob, TrainSettings
from .lora_linear import use_fused_lora
from .loss import completion_loss
from .model import load_model, load_tokenizer, save_model_dir
from .precision import COMPUTE_DTYPES, resolve_precision
from .rmsnorm import use_fused_rmsnorm
from .rotary import use_fused_rotary
from .swiglu import use_lean_swiglu
from .tracking import Tracking

log = logging.getLogger("sftpipe")


def run_fingerprint(settings: dict, files: list[str | Path]) -> str:
    """What a checkpoint belongs to: a run resumes only from checkpoints of the same settings and
    input files (the base model's config, the data)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in files:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()[:16]


def last_complete_checkpoint(checkpoints: Path, main_process: bool = True) -> Path | None:
    """The newest checkpoint whose trainer state reads back; the main process deletes incomplete ones.

    The Trainer writes `trainer_state.json` last, so a kill while saving leaves a newer checkpoint
    without it (or with it cut short); resuming from that one would fail on every rerun.
    """
    complete: dict[int, Path] = {}
    incomplete: list[Path] = []
    for path in checkpoints.glob("checkpoint-*") if checkpoints.is_dir() else ():
        if not (match := re.fullmatch(r"checkpoint-(\d+)", path.name)):
            continue
        try:
            read_json(path / "trainer_state.json")
        except (ValueError, OSError):  # missing, cut short or not UTF-8
            incomplete.append(path)
            continue
        complete[int(match[1])] = path
    last = complete[max(complete)] if complete else None
    for path in incomplete:
        log.warning("ignoring %s: its save did not finish", path)
        if main_process:
            shutil.rmtree(path, ignore_errors=True)
    return last


QUANTIZATIONS = ("none", "qlora")


def quantization_config(settings: TrainSettings, precision: str):
    """QLoRA's 4-bit base: NF4 with double quantization (the QLoRA paper's recipe), computing in the
    training precision. bitsandbytes runs it on CUDA and, forward and backward, on CPU, where fp32
    compute is the fast path unless the CPU has native bf16 (bf16 is emulated, ~6-25x slower)."""
    if settings.quantization not in QUANTIZATIONS:
        raise PipelineError(
            f"config key 'train.quantization': '{settings.quantization}' is not one of {', '.join(QUANTIZATIONS)}"
        )
    if settings.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # not installed, or no native library for this device
        raise PipelineError(
            f"config key 'train.quantization': qlora needs bitsandbytes, which cannot run here ({err}); "
            "pip install bitsandbytes==0.50.2, or set it to 'none'"
        ) from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=COMPUTE_DTYPES[precision],
    )


def _completion_only_trainer():
    from trl import SFTTrainer

    class CompletionOnlySFTTrainer(SFTTrainer):
        """SFTTrainer whose loss projects only the completion positions onto the vocabulary
        (`sftpipe.loss.completion_loss`), counting the tokens and positions it computes."""

        fused_loss = True
        tokens_seen = 0  # real (non-pad) tokens trained on, for the throughput figure
        projected_positions = 0  # positions projected onto the vocabulary in training, for the FLOP count

        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            shard_where_accelerate_does_not(self)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, positions = completion_loss(model, inputs, self.accelerator.unwrap_model(model), self.fused_loss)
            if model.training:
                mask = inputs.get("attention_mask")
                self.tokens_seen += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
                self.projected_positions += int(positions)
            count = num_items_in_batch if num_items_in_batch is not None else (inputs["labels"][:, 1:] != -100).sum()
            loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, None) if return_outputs else loss

    return CompletionOnlySFTTrainer


def _progress_callback():
    from transformers import TrainerCallback

    class StepProgress(TrainerCallback):
        """Steps done, rate and ETA in the log (tqdm bars are unreadable in log files), and the
        optimizer steps this run performed."""

        steps_run = 0

        def on_train_begin(self, args, state, control, **kwargs):
            # A resumed run starts at its checkpoint's step, so the ETA counts only the steps left.
            self.progress = Progress("train steps", state.max_steps, every=30.0, unit="step", done=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            self.steps_run += 1
            self.progress.update()

    return StepProgress()


def _cast_outside_autocast(layer, x, dtype):
    if x is not None and torch.is_autocast_enabled(x.device.type):
        return x
    return type(layer)._cast_input_dtype(layer, x, dtype)


class LoraRecipe:
    """One process's share of a LoRA run, step by step."""

    loss_is_nll = True  # the loss is a mean negative log-likelihood, whose exponential is a perplexity

    def __init__(self, job: TrainJob) -> None:
        self.job, self.settings = job, job.settings
        self.precision = resolve_precision(self.settings.precision)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.main_process = int(os.environ.get("RANK", "0")) == 0
        self.fsdp = self.world_size > 1 and os.environ.get(STRATEGY_VARIABLE) == "fsdp"
        if self.fsdp and self.settings.quantization != "none":
            raise PipelineError("config key 'train.strategy': fsdp shards full-precision weights; use ddp with qlora")
        if self.settings.batch_size % self.world_size:
            raise PipelineError(
                f"config key 'train.batch_size': {self.settings.batch_size} examples do not split evenly "
                f"over {self.world_size} processes"
            )
        self.tracking = Tracking(job.report_to, job.name)
        # Checkpoints live outside the rule's outputs, keyed by what they belong to, so a rerun after
        # a kill resumes while a changed config starts afresh.
        # FSDP's checkpoints are sharded, which a DDP run cannot resume (nor FSDP a DDP one).
        layout = {"checkpoints": "sharded"} if self.fsdp else {}
        self.checkpoints = Path(job.work_dir) / run_fingerprint({**self.learned_settings(), **layout}, self.fingerprinted_files())

    def learned_settings(self) -> dict:
        """The settings that decide what the run learns, as its history records them."""
        return asdict(self.settings)

    def fingerprinted_files(self) -> list[str | Path]:
        """The input files a checkpoint of this run belongs to."""
        return [Path(self.job.base_dir) / "config.json", self.job.train_path, self.job.validation_path]

    def setup(self) -> None:
        self.setup_model()
        self.setup_data()
        self.setup_trainer()

    def setup_model(self) -> None:
        settings = self.settings
        torch.manual_seed(settings.seed)
        self.tokenizer = load_tokenizer(self.job.base_dir, self.job.trust_remote_code)
        quantization = quantization_config(settings, self.precision)
        if quantization is None:
            # The frozen base is stored in the training precision (bf16 halves it); the LoRA factors
            # peft adds stay in fp32.
            model = load_model(self.job.base_dir, self.job.trust_remote_code, dtype=COMPUTE_DTYPES[self.precision])
        else:
            from peft import prepare_model_for_kbit_training
            from transformers import AutoModelForCausalLM

            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            model = AutoModelForCausalLM.from_pretrained(
                self.job.base_dir,
                quantization_config=quantization,
                device_map={"": f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"},
                trust_remote_code=self.job.trust_remote_code,
                use_safetensors=True,
            )
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
        self.attention = use_attention(model, settings.attention) if settings.padding_free else "sdpa"
        if settings.lean_swiglu and not settings.gradient_checkpointing:
            use_lean_swiglu(model)
        if settings.fused_rmsnorm:
            use_fused_rmsnorm(model)
        use_fused_rotary(model, settings.fused_rope)
        self.model = model

    def load_split(self, path: str | Path):
        """The split's rows, or None for an empty one (a validation fraction of 0)."""
        from datasets import Dataset

        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in read_jsonl(path)]
        return Dataset.from_list(rows) if rows else None

    def setup_data(self) -> None:
        self.train_set, self.eval_set = self.load_split(self.job.train_path), self.load_split(self.job.validation_path)
        if self.train_set is None:
            raise PipelineError(
                f"{self.job.train_path}: the training split is empty (its stats.json tells how many rows were dropped "
                "as too long or too short: see data.max_length, data.overlong, data.min_tokens)"
            )
        if self.eval_set is None and self.settings.early_stopping_patience is not None:
            raise PipelineError(
                "config key 'train.early_stopping_patience': early stopping needs validation rows "
                "(data.split.validation_fraction above 0)"
            )

    def trainer_arguments(self) -> dict:
        """The trainer arguments every LoRA recipe sets, TRL's defaults among them made explicit."""
        settings = self.settings
        early_stopping = settings.early_stopping_patience is not None
        # Early stopping keeps the best checkpoint, so checkpoints must fall on evaluation steps.
        save_steps = (
            -(-settings.save_steps // settings.eval_steps) * settings.eval_steps if early_stopping else settings.save_steps
        )
        per_device = settings.batch_size // self.world_size
        return dict(
            output_dir=str(self.checkpoints),
            num_train_epochs=settings.epochs,
            max_steps=settings.max_steps,
            per_device_train_batch_size=per_device,
            per_device_eval_batch_size=per_device,
            gradient_accumulation_steps=settings.gradient_accumulation_steps,
            learning_rate=settings.learning_rate,
            lr_scheduler_type=settings.lr_scheduler,
            warmup_steps=settings.warmup_ratio,  # transformers 5: a value below 1 is a fraction of all steps
            weight_decay=settings.weight_decay,
            eval_strategy="steps" if self.eval_set is not None else "no",
            eval_steps=settings.eval_steps,
            logging_steps=settings.logging_steps,
            save_strategy="steps",
            save_steps=save_steps,
            load_best_model_at_end=early_stopping,
            metric_for_best_model="eval_loss" if early_stopping else None,
            greater_is_better=False if early_stopping else None,
            save_total_limit=2,
            seed=settings.seed,
            data_seed=settings.seed,
            # TRL 1.x turns bf16 and activation checkpointing on unless told: both are set here.
            bf16=self.precision == "bf16",
            fp16=self.precision == "fp16",
            activation_checkpointing=settings.gradient_checkpointing,
            use_cpu=not torch.cuda.is_available(),
            report_to=list(self.job.report_to) or "none",
            run_name=self.job.name,
            disable_tqdm=True,
            dataloader_num_workers=0,
            ddp_backend=None if torch.cuda.is_available() or self.world_size == 1 else "gloo",
            **self._fsdp_arguments(),
        )

    def lora_config(self):
        """A fresh LoRA adapter as `train:` shapes it."""
        from peft import LoraConfig

        settings = self.settings
        return LoraConfig(
            r=settings.lora_r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            target_modules=settings.target_modules,
            use_rslora=settings.use_rslora,
            use_dora=settings.use_dora,
            modules_to_save=settings.modules_to_save,
            task_type="CAUSAL_LM",
        )

    def callbacks(self) -> list:
        from transformers import EarlyStoppingCallback

        os.environ.update(self.tracking.environment())  # before the trainer creates its tracking callbacks
        self.progress = _progress_callback()
        callbacks = [self.progress, *([sharding_check()] if self.fsdp else [])]
        if self.settings.early_stopping_patience is not None:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=self.settings.early_stopping_patience))
        return callbacks

    def setup_trainer(self) -> None:
        from trl import SFTConfig

        settings = self.settings
        args = SFTConfig(
            **self.trainer_arguments(),
            # Padding-free batches carry no pad tokens; sequences stay isolated through position_ids.
            padding_free=settings.padding_free,
            # Without padding-free batches, similar lengths share a batch so little compute goes to padding.
            train_sampling_strategy="random" if settings.padding_free else "group_by_length",
            max_length=None,  # the tokenize stage already truncated to max_length
        )
        self.trainer = _completion_only_trainer()(
            model=self.model,
            args=args,
            train_dataset=self.train_set,
            eval_dataset=self.eval_set,
            processing_class=self.tokenizer,
            peft_config=self.lora_config(),
            callbacks=self.callbacks(),
        )
        # The fused loss reads the output projection's weight outside the forward, where FSDP has it sharded.
        self.trainer.fused_loss = settings.fused_loss and not self.fsdp
        self.factors_in_fp32()
        if settings.fused_lora:
            use_fused_lora(self.trainer.model)
        if settings.lean_lora and self.precision in ("bf16", "fp16"):
            self.factors_take_autocast_inputs()

    def factors_in_fp32(self) -> None:
        """TRL casts the LoRA factors of a quantized model to bf16; they train in fp32 here, like the
        optimizer's state (bf16 factors lose small updates, and bf16 is emulated on most CPUs)."""
        for parameter in self.trainer.model.parameters():
            if parameter.requires_grad and parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()

    def factors_take_autocast_inputs(self) -> None:
        """peft casts each LoRA layer's input to its factors' fp32, and autocast casts it back to bf16
        for the product: two copies of the input per layer, and the one kept for backward is that
        layer's own, where the layers reading one input (q, k, v; gate, up) could share it. Under
        autocast (the Trainer's forward) the input is left as it is and autocast casts the factors:
        the same values, without the copies. Outside autocast peft casts as before."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.trainer.model.modules():
            if isinstance(module, BaseTunerLayer):
                module._cast_input_dtype = types.MethodType(_cast_outside_autocast, module)

    def _fsdp_arguments(self) -> dict[str, Any]:
        """FSDP2 over the data-parallel processes (sftpipe.fsdp), or nothing."""
        return fsdp_arguments(self.model) if self.fsdp else {}

    def final_evaluation(self) -> dict:
        """The validation metrics of the trained adapter. The Trainer evaluates at the last step of a
        step-based schedule (transformers 5), so that evaluation is taken rather than run twice; only a
        run that reloads its best checkpoint, or one resumed past its last evaluation, evaluates here."""
        trainer = self.trainer
        last = [h for h in trainer.state.log_history if "eval_loss" in h and h["step"] == trainer.state.global_step]
        return last[-1] if last and not trainer.args.load_best_model_at_end else trainer.evaluate()

    def train(self) -> TrainSummary:
        trainer = self.trainer
        validation_rows = len(self.eval_set) if self.eval_set is not None else 0
        log.info(
            "training: %d train rows, %d validation rows, precision %s, attention %s, allocator %s",
            len(self.train_set),
            validation_rows,
            self.precision,
            self.attention,
            current_allocator(),
        )
        resume = last_complete_checkpoint(self.checkpoints, self.main_process)
        resumed_from = int(resume.name.removeprefix("checkpoint-")) if resume else 0
        if resume:
            log.info("resuming from %s (step %d)", resume, resumed_from)
        with self.tracking.run() as tracking:
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            final_eval = self.final_evaluation() if self.eval_set is not None else {}
        tokens, positions = self._over_all_processes(trainer.tokens_seen, trainer.projected_positions)
        return TrainSummary(
            train_loss=result.training_loss,
            eval_loss=final_eval.get("eval_loss"),
            eval_perplexity=math.exp(final_eval["eval_loss"]) if "eval_loss" in final_eval and self.loss_is_nll else None,
            steps=trainer.state.global_step,
            steps_run=self.progress.steps_run,
            resumed_from_step=resumed_from,
            train_runtime_s=result.metrics["train_runtime"],
            train_tokens=tokens,
            train_tokens_per_s=tokens / result.metrics["train_runtime"],
            projected_positions=positions,
            train_rows=len(self.train_set),
            validation_rows=validation_rows,
            precision=self.precision,
            attention=self.attention,
            world_size=self.world_size,
            allocator=current_allocator(),
            settings=self.learned_settings(),
            tracking=tracking,
        )

    def _over_all_processes(self, *counts: int) -> list[int]:
        if self.world_size == 1:
            return list(counts)
        total = torch.tensor(counts, dtype=torch.int64, device=self.trainer.args.device)
        torch.distributed.all_reduce(total)
        return total.tolist()

    def save(self, summary: TrainSummary) -> None:
        """The adapter (safetensors) and the history, from the main process; then the checkpoints go.
        Under FSDP every process first gives its shards, so the adapter saved is whole."""
        state = gathered_state(self.trainer.model) if self.fsdp else None
        if not self.main_process:
            return
        save_model_dir(self.job.adapter_dir, self.trainer.model, self.tokenizer, state_dict=state)
        write_history(self.job.history_path, summary, self.trainer.state.log_history)
        shutil.rmtree(self.job.work_dir, ignore_errors=True)


def train_lora(job: TrainJob) -> TrainSummary:
    """Train a LoRA adapter in this process (one rank under torchrun); write it (safetensors) to
    `job.adapter_dir` and the log history to `job.history_path`."""
    recipe = LoraRecipe(job)
    recipe.setup()
    summary = recipe.train()
    recipe.save(summary)
    return summary


def die_with_parent() -> None:
    """End this process when the one that launched it ends (Linux): torchrun starts each worker in a
    session of its own, so a job killed with its process group (a scheduler's cancel, a killed
    Snakemake) would leave the workers training on, and a rerun would find them writing its files."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
