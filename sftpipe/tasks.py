"""lm-eval tasks as the pipeline uses them: configured by name, their data prepared once as local
JSONL (from the user's files, the mirror or the Hub) with every document checked, and their
official configs pointed at that local data. Evaluation and decontamination both read tasks here.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import located_rows, mirror_location
from .io import PipelineError, atomic_path, read_json, read_jsonl, sha256_file, write_json, write_jsonl

log = logging.getLogger("sftpipe")

PACKAGE_TASKS = Path(__file__).parent / "lm_eval_tasks"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TaskSpec:
    """One lm-eval task as configured under `eval.lm_eval.tasks`."""

    name: str
    num_fewshot: int = 0
    limit: int | None = None
    data_files: dict[str, str] | None = None  # split -> the user's own file, as configured
    apply_chat_template: bool = False  # prompts rendered with the model's chat template, as an instruct model is served
    system_instruction: str | None = None  # a system message (with the chat template) or a preamble (without)
    fewshot_as_multiturn: bool = False  # few-shot examples as earlier user/assistant turns (needs the chat template)
    data_dir: str | None = None  # the <split>.jsonl files `prepare_task_data` wrote

    def __post_init__(self) -> None:
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise PipelineError(
                f"config key 'eval.lm_eval.tasks' ({self.name}): fewshot_as_multiturn needs apply_chat_template: true"
            )


def _task_yamls(package_only: bool = False) -> Iterator[tuple[Path, str]]:
    """The task YAMLs: lm-eval's and the package's own, or the package's alone."""
    import lm_eval

    if not package_only:
        for path in (Path(lm_eval.__file__).parent / "tasks").rglob("*.yaml"):
            yield path, path.read_text(encoding="utf-8", errors="ignore")
    for path in PACKAGE_TASKS.glob("*.yaml"):
        yield path, path.read_text(encoding="utf-8")


def _task_dirs(names: tuple[str, ...]) -> list[str]:
    """The lm-eval task directories with a YAML that defines one of `names` as a task (a text scan)."""
    pattern = re.compile(rf"^task:\s*[\"']?({'|'.join(map(re.escape, names))})[\"']?\s*$", re.M)
    return sorted({str(path.parent) for path, text in _task_yamls() if pattern.search(text)})


@functools.cache
def _task_names(package_only: bool = False) -> frozenset[str]:
    """Every task, group and tag name the task YAMLs define (a text scan of lm-eval's ~14,000 takes
    half a second; its full index ~20 s to build)."""
    names = set()
    for _, text in _task_yamls(package_only):
        names.update(m[1] for m in re.finditer(r"^[\"']?(?:task|group|tag)[\"']?:\s*[\"']?([\w.-]+)[\"']?\s*$", text, re.M))
        for tags in re.finditer(r"^[\"']?tag[\"']?:\s*\n((?:[ \t]+-.*\n?)+)", text, re.M):
            names.update(re.findall(r"-\s*[\"']?([\w.-]+)", tags[1]))
    return frozenset(names)


def unknown_task(name: str) -> PipelineError:
    """The error for a task name no YAML defines, with the closest names."""
    close = difflib.get_close_matches(name, sorted(_task_names()), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return PipelineError(f"config key 'eval.lm_eval.tasks': '{name}' is not an lm-eval task defined by a YAML file{hint}")


def check_task_names(names: list[str]) -> None:
    """Stop at the first configured name that lm-eval does not know, before any job runs (downloads
    and hydration would otherwise run before the task's own job finds out). The text scan knows
    nearly every name; lm-eval's own index, slow to build, settles the few it misses. The package's
    own tasks (the demo's) need neither, so planning the demo costs no scan."""
    for name in names:
        if name in _task_names(package_only=True) or name in _task_names() or name in task_manager().task_index:
            continue
        raise unknown_task(name)


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


def registered_config(manager, name: str) -> dict[str, Any]:
    """The official config of task `name`, or an error naming the key and the closest task names."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise unknown_task(name)
    return load_yaml(entry.yaml_path, resolve_func=True)


def needed_splits(config: dict[str, Any], num_fewshot: int) -> list[str]:
    """The splits lm-eval reads for a task: its evaluation documents (test, else validation) and,
    with few-shot, the split its examples come from."""
    splits = [config.get("test_split") or config.get("validation_split")]
    if num_fewshot:
        splits.append(config.get("fewshot_split") or config.get("training_split") or config.get("validation_split"))
    return list(dict.fromkeys(s for s in splits if s))


def task_config(manager, spec: TaskSpec) -> dict[str, Any]:
    """The task's official config reading its prepared local files (`spec.data_dir`): only the data
    source changes; prompts, `process_docs`, choices and metrics stay the official ones."""
    config = registered_config(manager, spec.name)
    data_files = {path.stem: str(path) for path in sorted(Path(spec.data_dir).glob("*.jsonl"))} if spec.data_dir else {}
    if not data_files:
        raise PipelineError(f"lm-eval task '{spec.name}': no prepared data in {spec.data_dir}")
    local = {**config, "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": data_files}}
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if local.get(key) not in data_files:
            local[key] = None
    if local.get("test_split") is None and local.get("validation_split") is None:
        raise PipelineError(
            f"config key 'eval.lm_eval.tasks' ({spec.name}): its data has neither the task's test split "
            f"('{config.get('test_split')}') nor its validation split ('{config.get('validation_split')}')"
        )
    return local


def build_task(manager, spec: TaskSpec):
    [task] = manager.load_task_or_group([task_config(manager, spec)]).values()
    return task


def _sources(spec: TaskSpec, config: dict[str, Any], mirror_dir: str | None) -> Iterator[tuple[str, dict, Iterator]]:
    """(split, where the split comes from, its rows as (where, row)) for every split the task reads."""
    if spec.data_files:
        for split, path in spec.data_files.items():
            yield split, {"kind": "local", "path": str(Path(path).resolve())}, located_rows(Path(path))
        return
    import datasets

    hub_id, hub_config = config.get("dataset_path"), config.get("dataset_name")
    for split in needed_splits(config, spec.num_fewshot):
        mirrored = mirror_location(Path(mirror_dir), hub_id, hub_config, split) if mirror_dir else None
        if mirrored is not None:
            yield split, {"kind": "mirror", "path": str(mirrored.resolve())}, located_rows(mirrored)
        else:
            rows = datasets.load_dataset(hub_id, name=hub_config, split=split, **(config.get("dataset_kwargs") or {}))
            source = {"kind": "hub", "hub_id": hub_id, "config": hub_config, "fingerprint": rows._fingerprint}
            yield split, source, ((f"{hub_id} ({split}) row {i}", row) for i, row in enumerate(rows))


def prepare_task_data(spec: TaskSpec, out_dir: str | Path, mirror_dir: str | None = None) -> dict[str, Any]:
    """Write the splits the task reads to `<out_dir>/<split>.jsonl`, from the user's `data_files`, the
    mirror or the Hub, so that evaluation and decontamination read local files (on a cluster, compute
    nodes stay offline); then check every document through the task's own prompt, choice and target
    functions. A bad document is an error naming the task, the file and line and the value."""
    manager = task_manager((spec.name,))
    config = registered_config(manager, spec.name)
    manifest: dict[str, Any] = {"task": spec.name, "splits": {}}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        locations: dict[str, list[str]] = {}
        for split, source, rows in _sources(spec, config, mirror_dir):
            where: list[str] = []

            def located(rows=rows, where=where):
                for place, row in rows:
                    where.append(place)
                    yield row

            count = write_jsonl(
                tmp / f"{split}.jsonl", located(), if_empty=f"lm-eval task '{spec.name}': split '{split}' has no rows"
            )
            locations[split] = where
            manifest["splits"][split] = {**source, "rows": count, "sha256": sha256_file(tmp / f"{split}.jsonl")}
            log.info("lm-eval task %s: %d %s rows from %s", spec.name, count, split, source["kind"])
        documents = check_documents(built_task(manager, spec.name, tmp, config, locations), config, locations)
        manifest["documents_checked"] = documents
        write_json(tmp / MANIFEST, manifest)
    return manifest


# What a task's data source is, as its YAML defines it.
SOURCE_KEYS = ("dataset_path", "dataset_name", "test_split", "validation_split", "training_split", "fewshot_split")


def task_sources(names: list[str]) -> dict[str, dict[str, Any]]:
    """The data source keys of each task, read from lm-eval's task YAMLs and cached on disk per
    lm-eval version and sftpipe task set: the workflow asks on every run (to name a task's mirror
    files as inputs), and indexing the YAMLs takes seconds."""
    from importlib.metadata import version

    package = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(PACKAGE_TASKS.glob("*.yaml")))).hexdigest()[:12]
    cache = (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "sftpipe"
        / f"lm_eval-{version('lm_eval')}-{package}.json"
    )
    try:
        known = read_json(cache)
    except (OSError, ValueError):
        known = {}
    missing = sorted(set(names) - set(known))
    if missing:
        manager = task_manager(tuple(missing))
        for name in missing:
            config = registered_config(manager, name)
            known[name] = {key: config.get(key) for key in SOURCE_KEYS}
        try:
            write_json(cache, known)
        except OSError as err:  # a read-only home: ask again next time
            log.warning("cannot cache lm-eval task sources in %s: %s", cache, err)
    return {name: known[name] for name in names}


def mirror_files(name: str, num_fewshot: int, mirror_dir: str) -> list[Path]:
    """The mirror files the task's data would be prepared from."""
    source = task_sources([name])[name]
    found = (
        mirror_location(Path(mirror_dir), source["dataset_path"], source["dataset_name"], split)
        for split in needed_splits(source, num_fewshot)
    )
    return [path for path in found if path is not None]


# Which split each of a task's document lists comes from.
DOCUMENT_ROLES = {
    "test_split": "test_docs",
    "validation_split": "validation_docs",
    "training_split": "training_docs",
    "fewshot_split": "fewshot_docs",
}


def check_documents(task, config: dict[str, Any], locations: dict[str, list[str]]) -> int:
    """Run every document of every prepared split through the task's `doc_to_text`, `doc_to_choice`
    and `doc_to_target`, as evaluation will; return how many were checked."""
    checked, seen = 0, set()
    for role, method in DOCUMENT_ROLES.items():
        split = config.get(role)
        if split not in locations or split in seen:
            continue
        seen.add(split)
        docs = list(getattr(task, method)())
        rows = list(read_jsonl(Path(task.config.dataset_kwargs["data_files"][split])))
        # process_docs maps row to document for the official tasks; otherwise say which document.
        if len(docs) != len(rows):
            rows, locations[split] = docs, [f"{split} document {i}" for i in range(len(docs))]
        for place, doc, row in zip(locations[split], docs, rows, strict=True):
            _check_document(task, doc, f"{place}: lm-eval task '{config['task']}'", row)
            checked += 1
    return checked


def built_task(manager, name: str, data_dir: Path, config: dict[str, Any], locations: dict[str, list[str]]):
    """The task on the prepared files in `data_dir`. lm-eval renders the first evaluation document
    while it builds a task, before check_documents can name it: a build that fails, and succeeds
    without that document, names it (file, line and value)."""
    try:
        return build_task(manager, TaskSpec(name, data_dir=str(data_dir)))
    except PipelineError:
        raise
    except Exception as err:  # whatever the task's own template or function raises on that document
        split = next(s for s in (config.get("test_split"), config.get("validation_split")) if s in locations)
        path = data_dir / f"{split}.jsonl"
        first, *rest = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(rest), encoding="utf-8")
        try:
            task = build_task(manager, TaskSpec(name, data_dir=str(data_dir)))
        except Exception:
            where, shown = f"{locations[split][0].rsplit(':', 1)[0]}", "one of its documents"
        else:
            where, row = locations[split][0], json.loads(first)
            # The same checks as every other document's, on the task built without it.
            _check_document(task, _as_document(task, row), f"{where}: lm-eval task '{name}'", row)
            shown = "the row " + json.dumps(_shorten(row), ensure_ascii=False)
        raise PipelineError(
            f"{where}: lm-eval task '{name}': the task cannot read {shown} ({type(err).__name__}: {err})"
        ) from None


def _as_document(task, row: dict[str, Any]) -> dict[str, Any]:
    """`row` as the task's documents are: through its `process_docs`, where it has one."""
    process = getattr(task.config, "process_docs", None)
    if process is None:
        return row
    import datasets

    return next(iter(process(datasets.Dataset.from_list([row]))))


def _shorten(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= 60 else value[:57] + "..."
    if isinstance(value, list):
        return [_shorten(v) for v in value]
    if isinstance(value, dict):
        return {k: _shorten(v) for k, v in value.items()}
    return value


def _check_document(task, doc: dict[str, Any], where: str, row: dict[str, Any]) -> None:
    def shown() -> str:
        return "the row " + json.dumps(_shorten(row), ensure_ascii=False, default=str)

    try:
        task.doc_to_text(doc)
        target = task.doc_to_target(doc)
        if task.OUTPUT_TYPE != "multiple_choice":
            return
        choices = task.doc_to_choice(doc)
    except Exception as err:  # whatever the task's own template or function raises on this document
        raise PipelineError(f"{where}: the task cannot read {shown()} ({type(err).__name__}: {err})") from None
    if not choices:
        raise PipelineError(f"{where}: the document has no choices: {shown()}")
    if isinstance(target, int) and not 0 <= target < len(choices):
        raise PipelineError(f"{where}: the answer index {target} is not among its {len(choices)} choices: {shown()}")
    if isinstance(target, str) and target not in choices:
        raise PipelineError(f"{where}: the answer {target!r} is not among its choices {choices}: {shown()}")
