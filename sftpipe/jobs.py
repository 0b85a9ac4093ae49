"""What a training job is, without torch: the `train:` settings that decide what it learns
(TrainSettings) and SFT's job (TrainJob; RL's is sftpipe.rl_settings.RLJob), which sftpipe.launch
hands to the processes it starts as JSON. A stage's own process imports this and not the trainers,
so that it holds no copy of torch's libraries beside the training process it waits for."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar


@dataclass(frozen=True)
class TrainSettings:
    """The `train:` keys that decide what the adapter learns, key for key: the job's cache key and
    its checkpoints' fingerprint. How it executes (`sftpipe.execution.Execution`) is not among them."""

    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # dropout keeps a dropped copy of every LoRA input: +1.1 GB peak RSS at 0.05 on SmolLM2-135M
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    quantization: str = "none"  # one of QUANTIZATIONS: qlora is a 4-bit NF4 base
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8  # examples per step over all processes, so the process count changes nothing learned
    gradient_accumulation_steps: int = 1
    eval_steps: int = 50
    logging_steps: int = 10
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    padding_free: bool = True
    attention: str = "auto"  # see sftpipe.attention
    lean_swiglu: bool = True  # see sftpipe.swiglu; off under gradient checkpointing
    fused_rmsnorm: bool = True  # see sftpipe.rmsnorm
    lean_lora: bool = True  # see LoraRecipe.factors_take_autocast_inputs
    fused_lora: bool = True  # see sftpipe.lora_linear
    fused_rope: bool = True  # see sftpipe.rotary
    fused_loss: bool = True  # see sftpipe.loss
    gradient_checkpointing: bool = False
    save_steps: int = 100  # checkpoint interval; a killed run resumes from the last one
    early_stopping_patience: int | None = None  # stop after this many evaluations without a better eval loss


class LaunchedJob:
    """A job as sftpipe.launch hands it to the process it starts: JSON, read back field for field."""

    runner: ClassVar[str]  # what trains it: `module:function` (sftpipe.worker.run_job)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str):
        fields = json.loads(text)
        return cls(**{**fields, **cls.typed_fields(fields)})

    @classmethod
    def typed_fields(cls, fields: dict) -> dict:
        """The fields JSON does not give back as they were."""
        return {"settings": TrainSettings(**fields["settings"]), "report_to": tuple(fields["report_to"])}


@dataclass(frozen=True)
class TrainJob(LaunchedJob):
    """One training run: what it reads, what it writes, and what it learns."""

    base_dir: str | Path
    train_path: str | Path
    validation_path: str | Path
    adapter_dir: str | Path
    history_path: str | Path
    work_dir: str | Path  # checkpoints, outside the stage's outputs so that a rerun finds them
    settings: TrainSettings
    trust_remote_code: bool = False
    name: str = "train"  # the experiment: the tracked run's name
    report_to: tuple[str, ...] = ()  # trackers of the run (sftpipe.tracking); they change nothing learned
    runner: ClassVar[str] = "sftpipe.train:train_lora"  # what trains it (sftpipe.worker.run_job)
