"""Train stage: LoRA supervised fine-tuning with peft + TRL on the tokenized train split."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .io import PipelineError, Progress, atomic_path, read_json, read_jsonl, sha256_file, write_json
from .model import load_model, load_tokenizer
from .swiglu import use_lean_swiglu

log = logging.getLogger("sftpipe")


@dataclass(frozen=True)
class TrainSettings:
    """The `train:` config section, key for key."""

    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # dropout keeps a dropped copy of every LoRA input: +1.1 GB peak RSS at 0.05 on SmolLM2-135M
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    quantization: str = "none"  # none | qlora (4-bit NF4 base, CUDA only)
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    eval_steps: int = 50
    logging_steps: int = 10
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    padding_free: bool = True
    gradient_checkpointing: bool = False
    allocator: str = "auto"  # auto | tcmalloc | jemalloc | system: see allocator_library
    save_steps: int = 100  # checkpoint interval; a killed run resumes from the last one
    processes: int = 1  # data-parallel processes (DDP): one per GPU, or gloo processes on CPU
    gpus: int = 1  # GPUs the job asks the scheduler for; more than one means one process per GPU
    early_stopping_patience: int | None = None  # stop after this many evaluations without a better eval loss


@dataclass(frozen=True)
class TrainJob:
    """One training run: what it reads, what it writes, and how."""

    base_dir: str | Path
    train_path: str | Path
    validation_path: str | Path
    adapter_dir: str | Path
    history_path: str | Path
    work_dir: str | Path  # checkpoints, outside the stage's outputs so that a rerun finds them
    settings: TrainSettings
    trust_remote_code: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> TrainJob:
        fields = json.loads(text)
        return cls(**{**fields, "settings": TrainSettings(**fields["settings"])})


def resolve_precision(precision: str) -> str:
    """`auto` picks bf16 where the hardware runs it natively (CUDA with bf16, or a CPU with AMX/AVX512-BF16)."""
    if precision != "auto":
        if precision == "fp16" and not torch.cuda.is_available():
            raise PipelineError("config key 'train.precision': fp16 needs CUDA; use bf16 or fp32 on CPU")
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if _cpu_has_native_bf16() else "fp32"


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


VARLEN_SDPA = "sftpipe_varlen_sdpa"


def use_varlen_attention(model) -> None:
    """Attend each example of a padding-free batch on its own.

    With sdpa, transformers isolates packed examples through one dense block-diagonal mask over the
    whole packed row: its cost grows with the square of the row, per-example calls with the sum of
    the squares of the examples. Inputs without sequence boundaries (padded batches, generation)
    take the stock sdpa path with its mask.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def varlen_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                    cu_seq_lens_q=None, **kwargs):
        if cu_seq_lens_q is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        bounds = cu_seq_lens_q.tolist()
        grouped = getattr(module, "num_key_value_groups", 1) > 1
        out = torch.cat(
            [
                torch.nn.functional.scaled_dot_product_attention(
                    query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                    dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=grouped,
                )
                for start, end in zip(bounds[:-1], bounds[1:])
                if end > start
            ],
            dim=2,
        )
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)
    model.set_attn_implementation(VARLEN_SDPA)


# Architectures whose logits are exactly `lm_head(hidden_states)`: no softcapping or logit scaling
# after the projection, which the fused loss below would skip.
PLAIN_LM_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Logit elements per chunk of the fused loss: 32 MB in fp32, whatever the vocabulary.
LOSS_CHUNK_ELEMENTS = 1 << 23


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross entropy of `hidden @ weight.T` against `targets` (-100 ignored), chunk by chunk.

    The loss is a scalar, so its gradient for `hidden` is computed during the forward and kept;
    neither the [positions, vocabulary] logits nor their softmax outlive a chunk. On a small model
    those are the largest tensors of a LoRA step. `weight` is frozen: it gets no gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, with_grad: bool) -> torch.Tensor:
        rows = max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if with_grad else None
        for start in range(0, hidden.shape[0], rows):
            chunk_targets = targets[start : start + rows]
            logits = (hidden[start : start + rows] @ weight.T).float()
            log_norm = torch.logsumexp(logits, dim=-1)
            learned = chunk_targets != -100
            picked = chunk_targets.clamp(min=0)
            total += ((log_norm - logits.gather(1, picked[:, None]).squeeze(1)) * learned).sum()
            if grad is None:
                continue
            probs = logits.sub_(log_norm[:, None]).exp_()
            probs[torch.arange(len(picked), device=probs.device), picked] -= 1
            probs.mul_(learned[:, None])
            grad[start : start + rows] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`LinearCrossEntropy`, which computes the gradient only when one will be asked for (not in evaluation)."""
    return LinearCrossEntropy.apply(hidden, weight, targets, torch.is_grad_enabled() and hidden.requires_grad)


def _frozen_output_projection(model) -> tuple[torch.nn.Module, str, torch.nn.Linear] | None:
    """(causal LM, attribute name, lm_head) when the fused loss applies: a plain architecture whose
    bias-free output projection is frozen (not in `modules_to_save`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if (
        getattr(base.config, "model_type", None) not in PLAIN_LM_HEAD_MODELS
        or type(head) is not torch.nn.Linear
        or head.bias is not None
        or head.weight.requires_grad
    ):
        return None
    return base, next(name for name, child in base.named_children() if child is head), head


def _completion_only_trainer():
    import torch.nn.functional as F
    from trl import SFTTrainer

    class CompletionOnlySFTTrainer(SFTTrainer):
        """SFTTrainer whose loss projects only the completion positions onto the vocabulary, and
        where it can, chunk by chunk without keeping logits (`linear_cross_entropy`).

        Prompt positions carry label -100 and add nothing to the loss, yet computing their
        vocabulary logits dominates a step when prompts are long and answers short.
        """

        tokens_seen = 0  # real (non-pad) tokens trained on, for the throughput figure

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                mask = inputs.get("attention_mask")
                self.tokens_seen += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            labels = inputs["labels"][:, 1:]
            # Positions whose next token is learned; `logits_to_keep` makes the model project only
            # those onto the vocabulary, while the forward still runs through any DDP wrapper.
            keep = (labels != -100).any(dim=0).nonzero().squeeze(-1)
            model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            targets = labels[:, keep]
            projection = _frozen_output_projection(self.accelerator.unwrap_model(model))
            if projection is None:
                logits = model(**model_inputs, use_cache=False, logits_to_keep=keep).logits
                loss = F.cross_entropy(
                    logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
                )
            else:
                # The forward (through any DDP wrapper) returns the hidden states at `keep`; the
                # projection happens inside the fused loss.
                base, name, head = projection
                setattr(base, name, torch.nn.Identity())
                try:
                    hidden = model(**model_inputs, use_cache=False, logits_to_keep=keep).logits
                finally:
                    setattr(base, name, head)
                loss = linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), head.weight, targets.reshape(-1))
            count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
            loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, None) if return_outputs else loss

    return CompletionOnlySFTTrainer


def _progress_callback():
    from transformers import TrainerCallback

    class StepProgress(TrainerCallback):
        """Steps done, rate and ETA in the log, since tqdm bars are unreadable in log files."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.progress = Progress("train steps", state.max_steps, every=30.0)

        def on_step_end(self, args, state, control, **kwargs):
            self.progress.update()

    return StepProgress()


def run_fingerprint(base_dir: str | Path, train_path: str | Path, validation_path: str | Path, settings: TrainSettings) -> str:
    """What a checkpoint belongs to: a run resumes only from checkpoints of the same base, data and settings."""
    digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    for path in (Path(base_dir) / "config.json", train_path, validation_path):
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


def _quantization_config(settings: TrainSettings):
    if settings.quantization == "none":
        return None
    if not torch.cuda.is_available():
        raise PipelineError("config key 'train.quantization': QLoRA needs CUDA (bitsandbytes 4-bit); set it to 'none' on CPU")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _load_split(path: str | Path):
    from datasets import Dataset

    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in read_jsonl(path)]
    if not rows:
        raise PipelineError(f"{path}: the split is empty; lower the validation/test fractions or add data")
    return Dataset.from_list(rows)


def train_lora(job: TrainJob) -> dict[str, Any]:
    """Train a LoRA adapter in this process (one rank under torchrun); write it (safetensors) to
    `job.adapter_dir` and the log history to `job.history_path`."""
    from peft import LoraConfig
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig

    settings, base_dir, trust_remote_code = job.settings, job.base_dir, job.trust_remote_code
    precision = resolve_precision(settings.precision)
    quantization = _quantization_config(settings)
    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(base_dir, trust_remote_code)
    if quantization is None:
        model = load_model(base_dir, trust_remote_code)
    else:
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=quantization, trust_remote_code=trust_remote_code, use_safetensors=True
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    if settings.padding_free and model.config._attn_implementation == "sdpa":
        use_varlen_attention(model)
    if not settings.gradient_checkpointing:
        use_lean_swiglu(model)
    train_set, eval_set = _load_split(job.train_path), _load_split(job.validation_path)
    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules,
        use_rslora=settings.use_rslora,
        use_dora=settings.use_dora,
        modules_to_save=settings.modules_to_save,
        task_type="CAUSAL_LM",
    )
    # Checkpoints live outside the rule's outputs, keyed by what they belong to, so a rerun after a
    # kill resumes while a changed config starts afresh.
    checkpoints = Path(job.work_dir) / run_fingerprint(base_dir, job.train_path, job.validation_path, settings)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    early_stopping = settings.early_stopping_patience is not None
    # Early stopping keeps the best checkpoint, so checkpoints must fall on evaluation steps.
    save_steps = -(-settings.save_steps // settings.eval_steps) * settings.eval_steps if early_stopping else settings.save_steps
    main_process = int(os.environ.get("RANK", "0")) == 0
    args = SFTConfig(
        output_dir=str(checkpoints),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_ratio,  # transformers 5: a value below 1 is a fraction of all steps
        weight_decay=settings.weight_decay,
        eval_strategy="steps",
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
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        # Padding-free batches carry no pad tokens; sequences stay isolated through position_ids.
        padding_free=settings.padding_free,
        # Without padding-free batches, similar lengths share a batch so little compute goes to padding.
        train_sampling_strategy="random" if settings.padding_free else "group_by_length",
        activation_checkpointing=settings.gradient_checkpointing,
        max_length=None,  # the tokenize stage already truncated to max_length
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_backend=None if torch.cuda.is_available() or world_size == 1 else "gloo",
    )
    trainer = _completion_only_trainer()(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[_progress_callback()] + (
            [EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience)] if early_stopping else []
        ),
    )
    log.info("training: %d train rows, %d validation rows, precision %s, allocator %s",
             len(train_set), len(eval_set), precision, current_allocator())
    resume = last_complete_checkpoint(checkpoints, main_process)
    resumed_from = int(resume.name.removeprefix("checkpoint-")) if resume else 0
    if resume:
        log.info("resuming from %s (step %d)", resume, resumed_from)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    final_eval = trainer.evaluate()
    history = trainer.state.log_history
    summary = {
        "train_loss": result.training_loss,
        "eval_loss": final_eval.get("eval_loss"),
        "eval_perplexity": math.exp(final_eval["eval_loss"]) if "eval_loss" in final_eval else None,
        "steps": trainer.state.global_step,
        "resumed_from_step": resumed_from,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_tokens": trainer.tokens_seen,
        "train_tokens_per_s": trainer.tokens_seen / result.metrics["train_runtime"],
        "train_rows": len(train_set),
        "validation_rows": len(eval_set),
        "precision": precision,
        "world_size": world_size,
        "allocator": current_allocator(),
        "settings": asdict(settings),
    }
    if main_process:
        with atomic_path(job.adapter_dir) as tmp:
            trainer.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        write_json(job.history_path, {"summary": summary, "log_history": history})
        shutil.rmtree(job.work_dir, ignore_errors=True)
    return summary


# Shared-library names per allocator, best first: gperftools' minimal build is all tcmalloc needs.
ALLOCATOR_LIBRARIES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}


def current_allocator() -> str:
    """`tcmalloc` or `jemalloc` when this process runs on one (read from its memory map), else `system`."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return next((name for name in ALLOCATOR_LIBRARIES if f"lib{name}" in maps), "system")


def allocator_library(choice: str) -> str | None:
    """The library to preload into a training process for `train.allocator`, or None to train with
    this process's own allocator (`system`, one already preloaded, or `auto` where none is installed).

    PyTorch's CPU tensors come from malloc. glibc's keeps the activations freed after each backward
    as holes that the next step's differently sized tensors cannot reuse; tcmalloc's size classes
    reuse them.
    """
    if choice == "system" or not sys.platform.startswith("linux") or current_allocator() != "system":
        return None
    from ctypes.util import find_library

    for name in ALLOCATOR_LIBRARIES if choice == "auto" else (choice,):
        for library in ALLOCATOR_LIBRARIES[name]:
            # A conda env's own lib/ first (`--sdm conda` with gperftools), then the system's.
            in_prefix = Path(sys.prefix) / "lib" / f"lib{library}.so"
            if in_prefix.exists():
                return str(in_prefix)
            if found := find_library(library):
                return found
    if choice != "auto":
        raise PipelineError(
            f"config key 'train.allocator': {choice} is not installed "
            f"(Debian: apt install {'libtcmalloc-minimal4' if choice == 'tcmalloc' else 'libjemalloc2'}; "
            f"conda: {'gperftools' if choice == 'tcmalloc' else 'jemalloc'})"
        )
    return None


def _fd(stream) -> int | None:
    """The file descriptor behind `stream`, so a child process writes where this one does (the rule's log)."""
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def processes_for(settings: TrainSettings, gpus: int) -> int:
    """One process per GPU when the job holds several; otherwise `train.processes` (gloo on CPU)."""
    return gpus if gpus > 1 else settings.processes


def train(job: TrainJob, gpus: int = 1, threads: int = 1) -> dict[str, Any]:
    """`train_lora` in this process, or in child processes: under torchrun with one data-parallel
    worker per GPU the job holds (NCCL) or `train.processes` workers on CPU (gloo), each with its
    share of the threads; or one child when `train.allocator` needs a library preloaded."""
    processes = processes_for(job.settings, gpus)
    preload = allocator_library(job.settings.allocator)
    if processes <= 1 and preload is None:
        return train_lora(job)
    with tempfile.TemporaryDirectory() as scratch:
        call = Path(scratch) / "job.json"
        call.write_text(job.to_json())
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // processes))}
        if preload:
            env["LD_PRELOAD"] = " ".join(filter(None, [preload, os.environ.get("LD_PRELOAD")]))
            # tcmalloc reports every allocation over 1 GB on stderr: loading a large base model is not news.
            env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
        launcher = [sys.executable]
        if processes > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        command = [*launcher, "-m", "sftpipe.train", str(call)]
        log.info("launching %d training process(es)%s: %s", processes, f" on {preload}" if preload else "", " ".join(command))
        result = subprocess.run(command, env=env, stdout=_fd(sys.stdout), stderr=_fd(sys.stderr))
    if result.returncode != 0:
        raise PipelineError(f"training failed (exit {result.returncode}); see the log above")
    return read_json(job.history_path)["summary"]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    train_lora(TrainJob.from_json(Path(sys.argv[1]).read_text()))
