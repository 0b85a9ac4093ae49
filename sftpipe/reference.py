"""Reference stage: the log-probabilities a model gives each reply of the preference pairs, computed
once and stored for preference tuning to read (it never runs the reference model itself); and the
held-out rewards of a preference-tuned model measured against them.

A log-probability here is TRL's DPOTrainer's own: the sum, over a reply's tokens (its EOS included),
of log p(token | the prompt and the reply before it), over the token ids the tokenize stage wrote,
in the precision preference tuning trains in (its weights stored and its matmuls run as the trainer's
are): a policy that is still its reference therefore gets rewards of 0, to that precision's rounding,
on every host. A reference of another precision would hand DPO a biased margin at step 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .io import PipelineError, Progress, read_json, read_jsonl, sha256_file, write_json, write_jsonl
from .model import WEIGHT_SUFFIXES, load_model, load_tokenizer
from .precision import COMPUTE_DTYPES, resolve_precision

log = logging.getLogger("sftpipe")

REPLIES = ("chosen_ids", "rejected_ids")
# Logit elements one forward may hold (fp32: 256 MB, its log-softmax as much again): the batch shrinks
# as the positions it scores and the vocabulary grow.
LOGITS_BUDGET = 1 << 26
MAX_PAIRS = 16  # per forward: beyond this CPU throughput stops improving


def _batches(pairs: list[dict[str, Any]], vocab: int) -> Iterator[list[int]]:
    """Indices of `pairs` in batches of similar lengths whose scored positions fit LOGITS_BUDGET."""
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i]["prompt_ids"]), _longest(pairs[i])))
    batch: list[int] = []
    for i in order:
        candidate = [*batch, i]
        scored = max(_longest(pairs[j]) for j in candidate) - min(len(pairs[j]["prompt_ids"]) for j in candidate) + 1
        if batch and (len(candidate) > MAX_PAIRS or 2 * len(candidate) * scored * vocab > LOGITS_BUDGET):
            yield batch
            candidate = [i]
        batch = candidate
    if batch:
        yield batch


def _longest(pair: dict[str, Any]) -> int:
    return len(pair["prompt_ids"]) + max(len(pair[reply]) for reply in REPLIES)


def scoring_model(model_dir: str | Path, precision: str, trust_remote_code: bool = False, adapter_dir: str | Path | None = None):
    """The model at `model_dir` as preference tuning computes with it in `precision` (resolved: not
    `auto`): its weights stored in that dtype, in eval mode; with `adapter_dir`, that LoRA adapter
    on it, unmerged and in fp32, as a preference run that keeps training the SFT adapter holds it
    (a merged bf16 model rounds the adapter's update into the weights, which that run does not)."""
    model = load_model(model_dir, trust_remote_code, dtype=COMPUTE_DTYPES[precision])
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.float()
    return model.eval()


def _autocast(model, precision: str):
    """The Trainer's autocast for `precision` (accelerate's, for bf16 and fp16), around a forward."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(model.device.type, dtype=COMPUTE_DTYPES[precision])


@torch.inference_mode()
def sequence_logps(model, pairs: list[dict[str, Any]], pad_token_id: int, precision: str = "fp32") -> list[tuple[float, float]]:
    """(chosen, rejected) log-probabilities of each pair's replies (see the module docstring).

    Only the positions that predict a reply token are projected onto the vocabulary
    (`logits_to_keep`): prompts are most of a pair's tokens.
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(pairs)
    progress = Progress("reply log-probs", len(pairs))
    for batch in _batches(pairs, vocab):
        sequences = [pairs[i]["prompt_ids"] + pairs[i][reply] for i in batch for reply in REPLIES]
        starts = [len(pairs[i]["prompt_ids"]) for i in batch for _ in REPLIES]
        width = max(map(len, sequences))
        ids = torch.tensor([s + [pad_token_id] * (width - len(s)) for s in sequences], device=model.device)
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=model.device)
        # Position p predicts token p + 1: the positions from the earliest reply's start - 1 onwards.
        first = min(starts) - 1
        keep = torch.arange(first, width - 1, device=model.device)
        with _autocast(model, precision):
            logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=keep, use_cache=False).logits
        logits = logits.float()
        targets = ids[:, first + 1 :]
        token_logps = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        predicted = keep[None, :] + 1
        in_reply = (predicted >= torch.tensor(starts, device=model.device)[:, None]) & (
            predicted < torch.tensor([len(s) for s in sequences], device=model.device)[:, None]
        )
        sums = (token_logps * in_reply).sum(dim=-1).tolist()
        for k, i in enumerate(batch):
            out[i] = (sums[2 * k], sums[2 * k + 1])
        progress.update(len(batch))
    return out


def _read_pairs(path: str | Path) -> list[dict[str, Any]]:
    pairs = list(read_jsonl(path))
    for lineno, pair in enumerate(pairs, start=1):
        missing = [key for key in ("id", "prompt_ids", *REPLIES) if key not in pair]
        if missing:
            raise PipelineError(f"{path}:{lineno}: not a tokenized preference pair (no {', '.join(missing)})")
    return pairs


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over a model directory's weight files: which reference the log-probs belong to."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).iterdir()):
        if path.suffix in WEIGHT_SUFFIXES:
            digest.update(path.name.encode() + sha256_file(path).encode())
    return digest.hexdigest()


def precompute_reference_logps(
    model_dir: str | Path,
    split_paths: dict[str, str | Path],
    out_path: str | Path,
    info_path: str | Path,
    precision: str = "auto",
    trust_remote_code: bool = False,
    sft_adapter_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Write `{id, split, ref_chosen_logps, ref_rejected_logps}` for every pair of every split, and
    beside it what they were computed with (the model's and the data's sha256, the precision:
    preference tuning's `train.precision`, resolved on this host). The model is the merged SFT model,
    or the base model under the SFT adapter (`sft_adapter_dir`) where preference tuning keeps
    training that adapter."""
    precision = resolve_precision(precision)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    model = scoring_model(model_dir, precision, trust_remote_code, sft_adapter_dir)
    rows, counts = [], {}
    for split, path in split_paths.items():
        pairs = _read_pairs(path)
        logps = sequence_logps(model, pairs, tokenizer.pad_token_id, precision)
        rows += [
            {"id": pair["id"], "split": split, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
            for pair, (chosen, rejected) in zip(pairs, logps, strict=True)
        ]
        counts[split] = len(pairs)
    write_jsonl(out_path, rows)
    info = {
        "model": str(model_dir),
        "model_sha256": model_fingerprint(model_dir),
        "sft_adapter": None if sft_adapter_dir is None else str(sft_adapter_dir),
        "data_sha256": {split: sha256_file(path) for split, path in split_paths.items()},
        "logps_sha256": sha256_file(out_path),
        "pairs": counts,
        "precision": precision,
        "definition": "sum over each reply's tokens, EOS included, of log p(token | prompt and reply before it)",
    }
    write_json(info_path, info)
    log.info("reference log-probs of %s pairs from %s in %s", counts, model_dir, precision)
    return info


def reference_precision(info_path: str | Path, precision: str, key: str = "preference.train.precision") -> str:
    """The precision the reference at `info_path` was computed in, which must be `precision` resolved
    on this host (a reference computed on a host of other precision gives step 0 a biased margin)."""
    computed, wanted = read_json(info_path).get("precision"), resolve_precision(precision)
    if computed != wanted:
        raise PipelineError(
            f"{info_path}: the reference log-probs were computed in {computed}, but '{key}: {precision}' trains in "
            f"{wanted} here; rerun precompute_reference_logps on a host of the same precision, or set {key}"
        )
    return computed


def read_reference(path: str | Path, ids: list[str], split_path: str | Path) -> dict[str, tuple[float, float]]:
    """id -> (chosen, rejected) reference log-probs of the pairs `ids` (of `split_path`), which the
    reference artifact must hold: a pair it lacks was tokenized after the reference was computed."""
    reference = {row["id"]: (row["ref_chosen_logps"], row["ref_rejected_logps"]) for row in read_jsonl(path)}
    missing = [i for i in ids if i not in reference]
    if missing:
        raise PipelineError(
            f"{path}: no reference log-probs for {len(missing)} pairs of {split_path} (first: {missing[0]}); "
            "the reference was computed on other data"
        )
    return {i: reference[i] for i in ids}


def evaluate_preference(
    model_dir: str | Path,
    test_path: str | Path,
    reference_path: str | Path,
    reference_info_path: str | Path,
    metrics_path: str | Path,
    pairs_path: str | Path,
    beta: float,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """The held-out pairs' implicit rewards, `beta * (log p_model(reply) - log p_reference(reply))`,
    the model scored in the reference's precision: how often the chosen reply's exceeds the rejected
    one's (reward accuracy), by how much (margin), and how often each model gives the chosen reply the
    higher likelihood."""
    pairs = _read_pairs(test_path)
    if not pairs:
        raise PipelineError(f"{test_path}: no held-out preference pairs; raise 'data.split.test_fraction'")
    reference = read_reference(reference_path, [p["id"] for p in pairs], test_path)
    precision = read_json(reference_info_path)["precision"]
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    model = scoring_model(model_dir, precision, trust_remote_code)
    scored = []
    logps = sequence_logps(model, pairs, tokenizer.pad_token_id, precision)
    for pair, (chosen, rejected) in zip(pairs, logps, strict=True):
        ref_chosen, ref_rejected = reference[pair["id"]]
        reward_chosen, reward_rejected = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
        scored.append(
            {
                "id": pair["id"],
                "dataset": pair["dataset"],
                "prompt": pair["prompt"],
                "chosen": pair["chosen"],
                "rejected": pair["rejected"],
                "logps": {"chosen": chosen, "rejected": rejected},
                "reference_logps": {"chosen": ref_chosen, "rejected": ref_rejected},
                "rewards": {"chosen": reward_chosen, "rejected": reward_rejected},
            }
        )
    write_jsonl(pairs_path, scored)
    metrics = {
        **reward_metrics(scored),
        "per_dataset": {
            name: reward_metrics([s for s in scored if s["dataset"] == name]) for name in sorted({s["dataset"] for s in scored})
        },
        "beta": beta,
        "precision": precision,
    }
    write_json(metrics_path, metrics)
    log.info(
        "held-out reward accuracy %.3f, margin %.4f on %d pairs",
        metrics["reward_accuracy"],
        metrics["reward_margin"],
        len(scored),
    )
    return metrics


def reward_metrics(scored: list[dict[str, Any]]) -> dict[str, Any]:
    """Reward accuracy (the chosen reply's reward strictly above the rejected one's, as TRL counts it),
    mean margin and rewards, and the likelihood accuracy of the model and of its reference."""
    n = len(scored)
    return {
        "pairs": n,
        "reward_accuracy": sum(s["rewards"]["chosen"] > s["rewards"]["rejected"] for s in scored) / n,
        "reward_margin": sum(s["rewards"]["chosen"] - s["rewards"]["rejected"] for s in scored) / n,
        "reward_chosen": sum(s["rewards"]["chosen"] for s in scored) / n,
        "reward_rejected": sum(s["rewards"]["rejected"] for s in scored) / n,
        "likelihood_accuracy": sum(s["logps"]["chosen"] > s["logps"]["rejected"] for s in scored) / n,
        "reference_likelihood_accuracy": sum(s["reference_logps"]["chosen"] > s["reference_logps"]["rejected"] for s in scored)
        / n,
    }
