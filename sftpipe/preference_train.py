"""Preference stage: a LoRA trained with TRL's DPOTrainer (DPO, or another of its pairwise losses) on
tokenized preference pairs, against the reference log-probs the reference stage computed once with
the merged SFT model (`sftpipe.reference`): a fresh LoRA on that merged model, or, with
`preference.start: adapter`, the SFT adapter itself trained further over the base model. The
trainer reads the reference log-probs from the data and never runs a reference model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .artifacts import TrainSummary
from .io import PipelineError, read_jsonl
from .preference_settings import PreferenceSettings
from .reference import read_reference, reference_precision
from .train import LoraRecipe, TrainSettings

log = logging.getLogger("sftpipe")

PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")
DISCOPOP_TAU = 0.05  # the DiscoPOP paper's temperature (TRL's default, set here explicitly)


@dataclass(frozen=True)
class PreferenceJob:
    """One preference run: what it reads, what it writes, and what it learns."""

    base_dir: str | Path  # the merged SFT model (start: merged), or the base model under the SFT adapter (start: adapter)
    train_path: str | Path  # tokenized pairs
    validation_path: str | Path
    reference_path: str | Path  # the reference stage's log-probs of every pair
    reference_info_path: str | Path  # what they were computed with (the precision among it)
    adapter_dir: str | Path
    history_path: str | Path
    work_dir: str | Path  # checkpoints, outside the stage's outputs so that a rerun finds them
    settings: TrainSettings
    preference: PreferenceSettings
    trust_remote_code: bool = False
    sft_adapter_dir: str | Path | None = None  # the SFT adapter trained on (start: adapter); None: a fresh LoRA
    name: str = "preference"  # the experiment: the tracked run's name
    report_to: tuple[str, ...] = ()  # the preference run is not tracked (LoraRecipe reads the field)


def _reference_reading_trainer():
    from trl import DPOTrainer

    class ReferenceReadingDPOTrainer(DPOTrainer):
        """DPOTrainer on pairs the tokenize stage encoded, whose `ref_chosen_logps` and
        `ref_rejected_logps` columns are the reference: with `precompute_ref_log_probs=True` its loss
        reads them from the batch, while TRL's own precompute (which would run the reference model over
        the data and add the same columns again) is replaced by a check that they are there."""

        tokens_seen = 0  # real (non-pad) tokens trained on, for the throughput figure
        projected_positions = 0  # positions projected onto the vocabulary in training

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            missing = [column for column in PAIR_COLUMNS if column not in dataset.column_names]
            if missing:
                raise PipelineError(f"the {dataset_name} pairs lack {', '.join(missing)}")
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            return dataset  # its reference columns were checked by _prepare_dataset

        forwards = 0  # forwards of the model's body during the loss being computed

        def count_forwards(self) -> None:
            """Count every forward of the model's decoder body: TRL runs a reference forward through
            that same body (the adapter disabled, or the model's copy), inline in its loss."""
            model = self.accelerator.unwrap_model(self.model)
            body = model.get_base_model() if hasattr(model, "get_base_model") else model
            body.get_decoder().register_forward_pre_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.tokens_seen += int(inputs["attention_mask"].sum())
                self.projected_positions += int(inputs["completion_mask"][:, 1:].sum())
            self.forwards = 0
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.forwards != 1:
                raise RuntimeError(
                    f"the preference loss ran {self.forwards} forwards of the model; a reference forward ran, though the "
                    "reference log-probs come from the reference stage"
                )
            return loss

    return ReferenceReadingDPOTrainer


@contextlib.contextmanager
def completion_positions_only() -> Iterator[None]:
    """TRL's fused LM head scores only the completion positions where Triton runs (CUDA, XPU) and
    every position elsewhere, prompts and padding included; on CPU, where a pair's prompt is most of
    its tokens, that is most of a step. This makes it take the completion-only path (the same tiles,
    the same values) everywhere. It switches `trl.trainer.utils._use_triton`, a private name of the
    pinned trl (tests/test_preference.py checks the losses are unchanged)."""
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = original


class PreferenceRecipe(LoraRecipe):
    """One process's preference run: LoraRecipe's model, adapter, schedule, checkpoints and
    summary; pairs for data, DPOTrainer for trainer."""

    loss_is_nll = False

    def __init__(self, job: PreferenceJob) -> None:
        self.preference = job.preference
        # Pairs are padded (TRL's DPO has no padding-free batches), for the stock attention.
        super().__init__(replace(job, settings=replace(job.settings, padding_free=False)))
        reference_precision(job.reference_info_path, job.settings.precision)

    def learned_settings(self) -> dict:
        return {**super().learned_settings(), **asdict(self.preference)}

    def fingerprinted_files(self) -> list[str | Path]:
        adapter = [Path(self.job.sft_adapter_dir) / "adapter_model.safetensors"] if self.job.sft_adapter_dir else []
        return [*super().fingerprinted_files(), self.job.reference_path, *adapter]

    def setup_model(self) -> None:
        """The base of `base_dir`; with `start: adapter`, the SFT adapter on it, trainable, which the
        run keeps training (its shape is the SFT's: the `train` keys of the LoRA do not apply)."""
        super().setup_model()
        if self.job.sft_adapter_dir is not None:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, str(self.job.sft_adapter_dir), is_trainable=True)

    def load_split(self, path: str | Path):
        from datasets import Dataset

        pairs = list(read_jsonl(path))
        if not pairs:
            return None
        reference = read_reference(self.job.reference_path, [p["id"] for p in pairs], path)
        return Dataset.from_list(
            [
                {
                    "prompt_ids": p["prompt_ids"],
                    "chosen_ids": p["chosen_ids"],
                    "rejected_ids": p["rejected_ids"],
                    "ref_chosen_logps": reference[p["id"]][0],
                    "ref_rejected_logps": reference[p["id"]][1],
                }
                for p in pairs
            ]
        )

    def setup_trainer(self) -> None:
        from trl import DPOConfig

        preference = self.preference
        args = DPOConfig(
            **self.trainer_arguments(),
            beta=preference.beta,
            loss_type=[preference.loss_type],
            loss_weights=None,
            label_smoothing=preference.label_smoothing,
            discopop_tau=DISCOPOP_TAU,
            f_divergence_type="reverse_kl",
            use_weighting=False,
            ld_alpha=None,
            # The loss reads the batch's reference columns; the trainer never computes them.
            precompute_ref_log_probs=True,
            sync_ref_model=False,
            disable_dropout=True,
            max_length=None,  # the tokenize stage already cut the pairs to max_length
            truncation_mode="keep_start",
            padding_free=False,
            pad_to_multiple_of=None,
            remove_unused_columns=True,
        )
        self.trainer = _reference_reading_trainer()(
            model=self.model,
            args=args,
            train_dataset=self.train_set,
            eval_dataset=self.eval_set,
            processing_class=self.tokenizer,
            # A fresh LoRA, unless the model already carries the SFT adapter to keep training (TRL then
            # keeps a frozen copy of it as its own reference, which the precomputed columns leave unused).
            peft_config=self.lora_config() if self.job.sft_adapter_dir is None else None,
            callbacks=self.callbacks(),
        )
        self.trainer.count_forwards()
        self.factors_in_fp32()

    def train(self) -> TrainSummary:
        with completion_positions_only():
            return super().train()


def train_preference(job: PreferenceJob) -> TrainSummary:
    """Train the preference adapter in this process; write it (safetensors) to `job.adapter_dir` and
    the log history (TRL's rewards, margins and accuracies among it) to `job.history_path`."""
    recipe = PreferenceRecipe(job)
    recipe.setup()
    summary = recipe.train()
    recipe.save(summary)
    log.info("preference tuning: train loss %.4f, validation loss %s", summary.train_loss, summary.eval_loss)
    return summary
