"""Evaluate stage: lm-evaluation-harness tasks and exact-match on the held-out split."""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from .data import mirror_location, read_local_rows
from .io import PipelineError, Progress, atomic_path, read_jsonl, sha256_file, write_json, write_jsonl
from .metrics import EXACT_MATCH_METRICS, normalize_answer, token_f1
from .model import load_model, load_tokenizer

log = logging.getLogger("sftpipe")

PACKAGE_TASKS = Path(__file__).parent / "lm_eval_tasks"

def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@torch.inference_mode()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Batched greedy decoding with left padding; each sequence stops at EOS."""
    tokenizer.padding_side = "left"
    # Similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    progress = Progress("generate", len(prompts))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = tokenizer([prompts[i] for i in index], return_tensors="pt", padding=True, add_special_tokens=True)
        batch = batch.to(model.device)
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        for i, text in zip(index, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[i] = text
        progress.update(len(index))
    return outputs


def exact_match_eval(
    model_dir: str | Path,
    test_path: str | Path,
    metrics_path: str | Path,
    predictions_path: str | Path,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    limit: int | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Greedy answers for the held-out prompts, scored strict and normalized against the references."""
    rows = list(read_jsonl(test_path))[:limit]
    if not rows:
        raise PipelineError(f"{test_path}: the test split is empty; raise 'data.split.test_fraction'")
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    model = load_model(model_dir, trust_remote_code).to(_device()).eval()
    predictions = generate_greedy(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    scored = []
    for row, prediction in zip(rows, predictions):
        reference = row["completion"]
        scored.append(
            {
                "id": row["id"],
                "dataset": row["dataset"],
                "prompt": row["prompt"],
                "reference": reference,
                "prediction": prediction,
                "exact_match": prediction.strip() == reference.strip(),
                "normalized_exact_match": normalize_answer(prediction) == normalize_answer(reference),
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
        "settings": {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "limit": limit, "decoding": "greedy"},
    }
    write_json(metrics_path, metrics)
    log.info("exact match: %.3f (normalized %.3f) on %d rows", metrics["exact_match"], metrics["normalized_exact_match"], len(scored))
    return metrics


def _rates(scored: list[dict[str, Any]]) -> dict[str, float]:
    return {key: sum(s[key] for s in scored) / len(scored) for key in EXACT_MATCH_METRICS}


@dataclass(frozen=True)
class TaskSpec:
    """One lm-eval task as configured under `eval.lm_eval.tasks`."""

    name: str
    num_fewshot: int = 0
    limit: int | None = None
    data_files: dict[str, str] | None = None  # split -> local file, as configured
    apply_chat_template: bool = False
    data_dir: str | None = None  # <split>.jsonl files written by `download_task_data`


def _registered_config(task_manager, name: str) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise PipelineError(f"config key 'eval.lm_eval.tasks': '{name}' is not an lm-eval task defined by a YAML file")
    return load_yaml(entry.yaml_path, resolve_func=True)


def _task_dirs(names: tuple[str, ...]) -> list[str]:
    """The lm-eval task directories with a YAML that defines one of `names` as a task (a text scan)."""
    import re

    import lm_eval

    pattern = re.compile(rf"^task:\s*[\"']?({'|'.join(map(re.escape, names))})[\"']?\s*$", re.M)
    root = Path(lm_eval.__file__).parent / "tasks"
    return sorted({str(p.parent) for p in root.rglob("*.yaml") if pattern.search(p.read_text(encoding="utf-8", errors="ignore"))})


@functools.cache
def task_manager(names: tuple[str, ...] = ()):
    """lm-eval's task index, built once per process. Indexing all of its ~14,000 task YAMLs takes
    ~20 s, so for named tasks only the directories defining them are indexed (a task's `include:`
    and `!function` paths are relative to its own file); the whole index is built when that does not
    register every name as a task (a group or a tag needs the tasks it names)."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    if names:
        manager = TaskManager(include_defaults=False, include_path=[str(PACKAGE_TASKS), *_task_dirs(names)])
        entries = [manager.task_index.get(name) for name in names]
        if all(entry is not None and entry.kind in (Kind.TASK, Kind.PY_TASK) for entry in entries):
            return manager
    return TaskManager(include_path=str(PACKAGE_TASKS))


def _local_data_files(spec: TaskSpec) -> dict[str, str] | None:
    if spec.data_files:
        return dict(spec.data_files)
    if spec.data_dir:
        return {path.stem: str(path) for path in sorted(Path(spec.data_dir).glob("*.jsonl"))} or None
    return None


def task_config(task_manager, spec: TaskSpec) -> str | dict[str, Any]:
    """The task by name, or, when its data is local, the same task config reading local files.

    Only the data source changes: prompts, `process_docs`, choices and metrics stay the official ones.
    """
    config = _registered_config(task_manager, spec.name)
    data_files = _local_data_files(spec)
    if data_files is None:
        return spec.name
    for name, path in data_files.items():
        if not Path(path).exists():
            raise PipelineError(f"config key 'eval.lm_eval.tasks' ({spec.name}): data file for split '{name}' not found: {path}")
    suffix = Path(next(iter(data_files.values()))).suffix.lstrip(".")
    local = {**config, "dataset_path": "parquet" if suffix == "parquet" else "json", "dataset_name": None}
    local["dataset_kwargs"] = {"data_files": data_files}
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if local.get(key) not in data_files:
            local[key] = None
    if local.get("test_split") is None and local.get("validation_split") is None:
        raise PipelineError(f"config key 'eval.lm_eval.tasks' ({spec.name}): local data has neither its test nor its validation split")
    return local


def needed_splits(config: dict[str, Any], num_fewshot: int) -> list[str]:
    """The splits lm-eval reads for a task: its evaluation documents (test, else validation) and,
    with few-shot, the split its examples come from."""
    splits = [config.get("test_split") or config.get("validation_split")]
    if num_fewshot:
        splits.append(config.get("fewshot_split") or config.get("training_split") or config.get("validation_split"))
    return list(dict.fromkeys(s for s in splits if s))


def download_task_data(spec: TaskSpec, out_dir: str | Path, mirror_dir: str | None = None) -> dict[str, Any]:
    """Fetch the splits the task reads, from the mirror or else the Hub, into `<out_dir>/<split>.jsonl`,
    so that evaluation and decontamination read local files (on a cluster, compute nodes stay offline)."""
    import datasets

    config = _registered_config(task_manager((spec.name,)), spec.name)
    hub_id, hub_config = config.get("dataset_path"), config.get("dataset_name")
    sources = {}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for split in needed_splits(config, spec.num_fewshot):
            mirrored = mirror_location(Path(mirror_dir), hub_id, hub_config, split) if mirror_dir else None
            if mirrored is not None:
                rows, source = read_local_rows(mirrored), {"kind": "mirror", "path": str(mirrored.resolve())}
            else:
                kwargs = config.get("dataset_kwargs") or {}
                rows = datasets.load_dataset(hub_id, name=hub_config, split=split, **kwargs)
                source = {"kind": "hub", "hub_id": hub_id, "config": hub_config, "fingerprint": rows._fingerprint}
            count = write_jsonl(tmp / f"{split}.jsonl", rows, if_empty=f"lm-eval task '{spec.name}': split '{split}' has no rows")
            sources[split] = {**source, "rows": count, "sha256": sha256_file(tmp / f"{split}.jsonl")}
            log.info("lm-eval task %s: %d %s rows from %s", spec.name, count, split, source["kind"])
    return sources


def lm_eval_tasks(
    model_dir: str | Path,
    tasks: list[TaskSpec],
    out_path: str | Path,
    batch_size: int = 16,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Run each task through lm-eval's `simple_evaluate`; record every setting beside every number."""
    from lm_eval import simple_evaluate

    manager = task_manager(tuple(sorted({spec.name for spec in tasks})))
    results: dict[str, Any] = {}
    for spec in tasks:
        config = task_config(manager, spec)
        log.info("lm-eval %s (%s data)", spec.name, "local" if isinstance(config, dict) else "Hub")
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
            log_samples=False,
        )
        metrics = output["results"][spec.name]
        results[spec.name] = {
            "metrics": {k: v for k, v in metrics.items() if k != "alias"},
            "n_samples": output["n-samples"][spec.name],
            "settings": {**asdict(spec), "batch_size": batch_size, "seed": seed},
            "data": "local" if isinstance(config, dict) else "hub",
        }
    summary = {"model": str(model_dir), "lm_eval_version": version("lm_eval"), "tasks": results}
    write_json(out_path, summary)
    return summary
