"""Online RL's settings: the `rl:` keys that decide what the GRPO adapter learns besides its training
keys, and the rewards it learns from. Plain Python, so that planning the workflow imports no torch."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .io import PipelineError
from .jobs import LaunchedJob, TrainSettings

# TRL 1.16's GRPO losses that need no other setting to be valid ("luspo" and "vespo" need a
# sequence-level importance sampling this section does not expose).
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo")
SCALE_REWARDS = ("group", "batch", "none")
# Where the RL adapter starts: a fresh LoRA on the merged SFT model, or the SFT adapter itself, trained
# on from the base model.
STARTS = ("merged", "adapter")
# The rewards a program computes from a completion and its row (sftpipe.rewards): the pipeline's own
# exact-match metrics, a regular expression, math answers, and the user's own function.
REWARD_KINDS = ("exact", "normalized_exact", "token_f1", "numeric", "format", "math", "function")

# `train` keys that do not apply to RL: TRL pads its generated batches and computes its own loss, the
# batch is `prompts_per_step` x `num_generations` completions, there is no validation loss, and
# `lean_lora` and `fused_lora` are the SFT trainer's alone (sftpipe.train).
NOT_FOR_RL = (
    "padding_free",
    "attention",
    "fused_loss",
    "lean_lora",
    "fused_lora",
    "batch_size",
    "eval_steps",
    "early_stopping_patience",
)


@dataclass(frozen=True)
class RewardSpec:
    """One reward and its weight in the sum the advantages are computed from."""

    kind: str  # one of REWARD_KINDS
    weight: float = 1.0
    pattern: str | None = None  # format: the regular expression a whole completion must match
    function: str | None = None  # function: `path/file.py:name`

    @property
    def name(self) -> str:
        """The reward's name in logs and errors: its kind, or the user function's `file.py:name`."""
        return self.function if self.kind == "function" else self.kind

    @property
    def file(self) -> str | None:
        """The user function's file, a rule input (editing it reruns RL)."""
        return self.function.rpartition(":")[0] if self.kind == "function" else None

    def check(self, key: str) -> None:
        if self.kind not in REWARD_KINDS:
            raise PipelineError(f"config key '{key}.kind': '{self.kind}' is not one of {', '.join(REWARD_KINDS)}")
        if (self.kind == "format") != (self.pattern is not None):
            raise PipelineError(f"config key '{key}.pattern': a pattern is given with kind format, and only then")
        if (self.kind == "function") != (self.function is not None):
            raise PipelineError(f"config key '{key}.function': a function is given with kind function, and only then")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise PipelineError(f"config key '{key}.pattern': not a regular expression ({err})") from None
        if self.function is not None:
            path, colon, name = self.function.rpartition(":")
            if not colon or not path.endswith(".py") or not name.isidentifier():
                raise PipelineError(f"config key '{key}.function': '{self.function}' is not path/file.py:name")
            if not Path(path).is_file():
                raise PipelineError(f"config key '{key}.function': {path} does not exist")


@dataclass(frozen=True)
class RLSettings:
    """The `rl:` keys that enter generation and the loss, key for key (its `datasets` choose the
    prompts, its `train` the schedule and the adapter)."""

    loss_type: str = "dapo"  # one of LOSS_TYPES
    num_generations: int = 8  # completions per prompt: a group, whose rewards the advantages compare
    prompts_per_step: int = 2
    max_completion_length: int = 16
    temperature: float = 1.0
    beta: float = 0.0  # KL to the start model; 0 runs no reference forward
    epsilon: float = 0.2
    scale_rewards: str = "group"  # one of SCALE_REWARDS
    num_iterations: int = 1
    start: str = "merged"  # one of STARTS
    use_vllm: bool = False
    rewards: tuple[RewardSpec, ...] = field(default=(RewardSpec("exact"),))

    @classmethod
    def from_config(cls, section: dict) -> RLSettings:
        """The settings from the `rl` section's keys (rewards as mappings; other keys ignored)."""
        known = {k: section[k] for k in cls.__dataclass_fields__ if k in section and k != "rewards"}
        rewards = tuple(RewardSpec(**reward) for reward in section.get("rewards", [{"kind": "exact"}]))
        return cls(**known, rewards=rewards)

    def check(self, key: str = "rl") -> None:
        """What the schema cannot say. `key` is where the settings were given."""
        for name, value, choices in (
            ("loss_type", self.loss_type, LOSS_TYPES),
            ("scale_rewards", self.scale_rewards, SCALE_REWARDS),
            ("start", self.start, STARTS),
        ):
            if value not in choices:
                raise PipelineError(f"config key '{key}.{name}': '{value}' is not one of {', '.join(choices)}")
        if self.num_generations < 2:
            raise PipelineError(f"config key '{key}.num_generations': GRPO compares completions within a group; give 2 or more")
        if not self.rewards:
            raise PipelineError(f"config key '{key}.rewards': give at least one reward")
        for i, reward in enumerate(self.rewards):
            reward.check(f"{key}.rewards[{i}]")


@dataclass(frozen=True)
class RLJob(LaunchedJob):
    """One RL run: what it reads, what it writes, and what it learns."""

    # The merged model before RL, SFT's or preference tuning's (start: merged), or the model under that
    # model's adapter (start: adapter).
    base_dir: str | Path
    train_path: str | Path  # the prompts: training-split rows with their reference answers
    adapter_dir: str | Path
    history_path: str | Path
    work_dir: str | Path  # checkpoints, outside the stage's outputs so that a rerun finds them
    settings: TrainSettings
    rl: RLSettings
    trust_remote_code: bool = False
    # The adapter trained on (start: adapter), SFT's or preference tuning's; None: a fresh LoRA.
    sft_adapter_dir: str | Path | None = None
    name: str = "rl"  # the tracked run's name
    report_to: tuple[str, ...] = ()  # trackers of the RL curves (sftpipe.tracking)
    validation_path: None = None  # RL has no validation loss (LoraRecipe reads the field)
    runner: ClassVar[str] = "sftpipe.grpo:train_rl"  # what trains it (sftpipe.worker.run_job)

    @classmethod
    def typed_fields(cls, fields: dict) -> dict:
        return {**super().typed_fields(fields), "rl": RLSettings.from_config(fields["rl"])}
