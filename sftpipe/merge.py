"""Merge stage: fold the LoRA adapter into the full-precision base and save a standalone model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .artifacts import TrainSummary, read_history
from .io import PipelineError, read_json
from .model import load_model, load_tokenizer, save_model_dir

log = logging.getLogger("sftpipe")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_card(base_dir: str | Path, training: TrainSummary | None, dtype: str) -> str:
    """A README for the merged model: where it came from and how it was trained."""
    source = read_json(Path(base_dir) / "sftpipe_source.json") if (Path(base_dir) / "sftpipe_source.json").exists() else {}
    lines = [
        "---",
        "library_name: transformers",
        "tags: [sftpipe, lora, sft]",
        "---",
        "# Merged LoRA fine-tune (sftpipe)",
        "",
        f"- base model: `{source.get('source', base_dir)}`"
        + (f" (revision `{source['revision']}`)" if source.get("revision") else ""),
        f"- saved dtype: {dtype}; weights: safetensors; "
        f"pad token `{source.get('pad_token')}` differs from EOS `{source.get('eos_token')}`",
    ]
    if training:
        lines += [
            f"- training: {training.steps} steps on {training.train_rows} rows, precision {training.precision}, "
            f"final train loss {training.train_loss:.4f}, "
            + (f"validation loss {training.eval_loss:.4f}" if training.eval_loss is not None else "no validation split"),
            "",
            "## Hyperparameters",
            "",
            "| key | value |",
            "|---|---|",
            *[f"| {key} | {value} |" for key, value in sorted(training.settings.items())],
        ]
    lines += ["", "Evaluation figures for this model are in the sftpipe report of its experiment."]
    return "\n".join(lines) + "\n"


def merge_adapter(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    history_path: str | Path | None = None,
) -> dict[str, Any]:
    """Merge in fp32 (never into a quantized base, which would round the update away), then cast and save."""
    from peft import PeftModel

    if dtype not in DTYPES:
        raise PipelineError(f"config key 'merge.dtype': '{dtype}' is not one of {', '.join(DTYPES)}")
    base = load_model(base_dir, trust_remote_code, dtype=torch.float32)
    tokenizer = load_tokenizer(base_dir, trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged = merged.to(DTYPES[dtype])
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.generation_config.eos_token_id = tokenizer.eos_token_id
    info = {"base": str(base_dir), "adapter": str(adapter_dir), "dtype": dtype}
    training = read_history(history_path)[0] if history_path else None
    save_model_dir(out_dir, merged, tokenizer, {"sftpipe_merge.json": info, "README.md": model_card(base_dir, training, dtype)})
    log.info("merged %s into %s (%s)", adapter_dir, base_dir, dtype)
    return info
