"""Preference tuning's settings: the `preference:` keys that decide what the preference adapter
learns besides its training keys. Plain Python, so that planning the workflow imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

from .io import PipelineError

# TRL's pairwise losses over the policy's and the reference's log-probs of the two replies (TRL's
# "sft" is a likelihood term, not a preference loss). "ipo" and "sigmoid_norm" divide by each reply's
# length; "exo_pair" needs label_smoothing above 0.
LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)

# Where the preference adapter starts: a fresh LoRA on the merged SFT model, or the SFT adapter itself,
# trained on from the base model. Either way the reference is the SFT model.
STARTS = ("merged", "adapter")

# `train` keys that do not apply to pairs: TRL's DPO pads its batches and computes its own loss, and
# `lean_lora` and `fused_lora` are the SFT trainer's alone (sftpipe.train).
NOT_FOR_PAIRS = ("padding_free", "attention", "fused_loss", "lean_lora", "fused_lora")


@dataclass(frozen=True)
class PreferenceSettings:
    """The `preference:` keys that enter the loss, key for key (its `datasets` choose the data, its
    `train` the schedule and the adapter)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"  # one of LOSS_TYPES
    label_smoothing: float = 0.0  # the share of pairs assumed flipped (robust, exo_pair, aot)
    start: str = "merged"  # one of STARTS

    def check(self, key: str = "preference") -> None:
        """What the schema cannot say: a label smoothing the loss type needs. `key` is where the
        settings were given."""
        if self.loss_type not in LOSS_TYPES:
            raise PipelineError(f"config key '{key}.loss_type': '{self.loss_type}' is not one of {', '.join(LOSS_TYPES)}")
        if self.start not in STARTS:
            raise PipelineError(f"config key '{key}.start': '{self.start}' is not one of {', '.join(STARTS)}")
        if self.loss_type == "exo_pair" and self.label_smoothing <= 0:
            raise PipelineError(
                f"config key '{key}.label_smoothing': loss_type exo_pair needs a label smoothing above 0 (its paper uses 0.001)"
            )
