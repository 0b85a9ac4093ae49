"""Evaluate stage: lm-evaluation-harness tasks and exact-match on the held-out split."""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from .io import PipelineError, Progress, read_json, read_jsonl, write_json, write_jsonl
from .metrics import EXACT_MATCH_METRICS, exact_match, normalized_exact_match, token_f1
from .model import load_model, load_tokenizer
from .tasks import MANIFEST, TaskSpec, task_config, task_manager
from .tokenization import IGNORE_INDEX, prompt_token_ids

log = logging.getLogger("sftpipe")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@torch.inference_mode()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Batched greedy decoding with left padding; each sequence stops at EOS. Prompts are tokenized as
    training tokenized them (`prompt_token_ids`)."""
    ids = prompt_token_ids(tokenizer, prompts)
    # Similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    progress = Progress("generate", len(prompts))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        width = max(len(ids[i]) for i in index)
        batch = {
            "input_ids": torch.tensor([[tokenizer.pad_token_id] * (width - len(ids[i])) + ids[i] for i in index]),
            "attention_mask": torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in index]),
        }
        batch = {key: value.to(model.device) for key, value in batch.items()}
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        for i, text in zip(index, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
            outputs[i] = text
        progress.update(len(index))
    return outputs


def evaluate_exact_match(
    model_dir: str | Path,
    test_path: str | Path,
    metrics_path: str | Path,
    predictions_path: str | Path,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    limit: int | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> dict[str, Any]:
    """Greedy answers for the held-out prompts (at most `limit`, drawn by `sample_rows`), scored strict
    and normalized against the references. With `gguf_file`, the model and tokenizer are read from
    that GGUF file in `model_dir`, as exported."""
    rows = sample_rows(list(read_jsonl(test_path)), limit, seed)
    if not rows:
        raise PipelineError(f"{test_path}: the test split is empty; raise 'data.split.test_fraction'")
    gguf = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = load_tokenizer(model_dir, trust_remote_code, **gguf)
    check_prompts_as_trained(tokenizer, rows, f"{test_path} with {model_dir}'s tokenizer")
    model = load_model(model_dir, trust_remote_code, **gguf).to(_device()).eval()
    predictions = generate_greedy(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    scored = []
    for row, prediction in zip(rows, predictions, strict=True):
        reference = row["completion"]
        scored.append(
            {
                "id": row["id"],
                "dataset": row["dataset"],
                "prompt": row["prompt"],
                "reference": reference,
                "prediction": prediction,
                "exact_match": exact_match(prediction, reference),
                "normalized_exact_match": normalized_exact_match(prediction, reference),
                "token_f1": token_f1(prediction, reference),
            }
        )
    write_jsonl(predictions_path, scored)
    metrics = {
        "rows": len(scored),
        **_rates(scored),
        "per_dataset": {
            name: {"rows": sum(1 for s in scored if s["dataset"] == name), **_rates([s for s in scored if s["dataset"] == name])}
            for name in sorted({s["dataset"] for s in scored})
        },
        "settings": {
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "limit": limit,
            "seed": seed,
            "sample": "all test rows" if limit is None else SAMPLE,
            "decoding": "greedy",
            **gguf,
        },
    }
    write_json(metrics_path, metrics)
    log.info(
        "exact match: %.3f (normalized %.3f) on %d rows", metrics["exact_match"], metrics["normalized_exact_match"], len(scored)
    )
    return metrics


SAMPLE = "a seeded sample of the test rows, each dataset's share in proportion to its rows"


def sample_rows(rows: list[dict[str, Any]], limit: int | None, seed: int) -> list[dict[str, Any]]:
    """At most `limit` of the test rows, in their order: each dataset's share of `limit` in proportion
    to its rows (largest remainders get the rows left over), each dataset's rows ranked by a seeded
    hash of their ids. The test split lists its rows grouped by dataset, so its first rows would
    score the first dataset alone; the hash draws the same rows for every variant and every rerun."""
    if limit is None or limit >= len(rows):
        return rows
    by_dataset: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_dataset[row["dataset"]].append(i)
    shares = {name: limit * len(indices) / len(rows) for name, indices in by_dataset.items()}
    counts = {name: int(share) for name, share in shares.items()}
    for name in sorted(shares, key=lambda n: (counts[n] - shares[n], n))[: limit - sum(counts.values())]:
        counts[name] += 1
    chosen = set()
    for name, indices in by_dataset.items():
        ranked = sorted(indices, key=lambda i: hashlib.sha256(f"{seed}:{rows[i]['id']}".encode()).digest())
        chosen.update(ranked[: counts[name]])
    return [row for i, row in enumerate(rows) if i in chosen]


def check_prompts_as_trained(tokenizer, rows: list[dict[str, Any]], where: str) -> None:
    """The prompts generation feeds the model must be the tokens training fed it (the rows' own
    `input_ids` before the first learned label): a tokenizer or rendering that drifted would score
    the model on prompts it never saw."""
    generated = prompt_token_ids(tokenizer, [row["prompt"] for row in rows])
    for row, ids in zip(rows, generated, strict=True):
        trained = row["input_ids"][: next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)]
        if ids != trained:
            first = next((i for i, (a, b) in enumerate(zip(ids, trained, strict=False)) if a != b), min(len(ids), len(trained)))
            raise PipelineError(
                f"{where}: row {row['id']}: the prompt generation would see differs from the one trained on at token {first} "
                f"({ids[first : first + 3]} vs {trained[first : first + 3]}); retokenize with the model's tokenizer"
            )


def _rates(scored: list[dict[str, Any]]) -> dict[str, float]:
    return {key: sum(s[key] for s in scored) / len(scored) for key in EXACT_MATCH_METRICS}


def per_document_scores(samples: list[dict[str, Any]]) -> dict[str, list]:
    """Each document's score on each metric, in document order: what a paired comparison of two
    models on the same documents needs."""
    samples = sorted(samples, key=lambda sample: sample["doc_id"])
    metrics = samples[0]["metrics"] if samples else []
    return {"doc_id": [s["doc_id"] for s in samples], **{m: [float(s[m]) for s in samples] for m in metrics}}


def evaluate_lm_harness(
    model_dir: str | Path,
    tasks: list[TaskSpec],
    out_path: str | Path,
    batch_size: int | str = 16,  # or "auto": lm-eval finds the largest that fits
    seed: int = 0,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Run each task through lm-eval's `simple_evaluate`; record every setting beside every number."""
    from lm_eval import simple_evaluate

    manager = task_manager(tuple(sorted({spec.name for spec in tasks})))
    results: dict[str, Any] = {}
    for spec in tasks:
        config = task_config(manager, spec)
        sources = {split: source["kind"] for split, source in read_json(Path(spec.data_dir) / MANIFEST)["splits"].items()}
        log.info("lm-eval %s on %s data", spec.name, sources)
        output = simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": "float32", "trust_remote_code": trust_remote_code},
            tasks=[config],
            num_fewshot=spec.num_fewshot,
            limit=spec.limit,
            batch_size=batch_size,
            device=_device(),
            task_manager=manager,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            apply_chat_template=spec.apply_chat_template,
            system_instruction=spec.system_instruction,
            fewshot_as_multiturn=spec.fewshot_as_multiturn,
            log_samples=True,
        )
        metrics = output["results"][spec.name]
        results[spec.name] = {
            "metrics": {k: v for k, v in metrics.items() if k != "alias"},
            "n_samples": output["n-samples"][spec.name],
            "per_document": per_document_scores(output["samples"][spec.name]),
            "settings": {**asdict(spec), "batch_size": batch_size, "seed": seed},
            "data": sources,
        }
    summary = {"model": str(model_dir), "lm_eval_version": version("lm_eval"), "tasks": results}
    write_json(out_path, summary)
    return summary
