"""Filter-and-mix stage: dedup, decontamination and mixing of the hydrated datasets of an experiment.

Every removed row is written with its reason and what it matched, so a user can check the filters.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .io import Progress, read_jsonl, write_json, write_jsonl
from .tokenization import SplitSettings, row_split

log = logging.getLogger("sftpipe")

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class FilterSettings:
    """The `data.filters` config section, key for key."""

    exact_dedup: bool = True
    near_dedup: bool = True
    near_dedup_threshold: float = 0.85
    decontaminate: bool = True
    ngram: int = 13  # as in GPT-3's decontamination
    seed: int = 0


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    """Word n-grams; a text shorter than n words counts as one gram, so short questions still match."""
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def _content(row: dict[str, Any]) -> str:
    """The row's own words without its prompt template, so a shared template never makes rows alike."""
    return row.get("content") or f"{row['prompt']}\n{row['completion']}"


def exact_duplicates(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Row id -> removal record for every row whose normalized prompt+completion was seen before."""
    first: dict[str, str] = {}
    removed = {}
    for row in rows:
        key = hashlib.sha256(" ".join(words(_content(row))).encode()).hexdigest()
        if key in first:
            removed[row["id"]] = {"reason": "exact_duplicate", "match": first[key]}
        else:
            first[key] = row["id"]
    return removed


def near_duplicates(rows: list[dict[str, Any]], threshold: float, seed: int) -> dict[str, dict[str, Any]]:
    """MinHash LSH over word 5-shingles: a row close to an earlier kept row (Jaccard >= threshold) goes.

    Rows of one conversation are never each other's duplicates: each turn's content holds the
    history before it, so a short late turn looks like the turn before it.
    """
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    source_of = {}
    removed = {}
    progress = Progress("near-dedup", len(rows))
    for row in rows:
        signature = MinHash(num_perm=128, seed=seed)
        signature.update_batch([" ".join(g).encode() for g in ngrams(words(_content(row)), 5)])
        source = row.get("source_id", row["id"])
        matches = [m for m in lsh.query(signature) if source_of[m] != source]
        source_of[row["id"]] = source
        if matches:
            removed[row["id"]] = {"reason": "near_duplicate", "match": min(matches)}
        else:
            lsh.insert(row["id"], signature)
        progress.update()
    return removed


MIN_REFERENCE_WORDS = 6  # a shorter evaluation text is too generic to prove contamination


def _strip_common_affixes(texts: list[list[str]]) -> list[list[str]]:
    """Drop the words every document starts or ends with ("Question: ... Answer:"): template, not content."""
    if len(texts) < 2:
        return texts
    shortest = min(len(t) for t in texts)
    prefix = next((i for i in range(shortest) if len({t[i] for t in texts}) > 1), shortest)
    suffix = next((i for i in range(shortest - prefix) if len({t[-1 - i] for t in texts}) > 1), shortest - prefix)
    return [t[prefix : len(t) - suffix] for t in texts]


def eval_references(tasks: Iterable[Any]) -> list[tuple[str, list[str]]]:
    """(task#doc, words) for every evaluation document: its question or context, alone and with its
    choices or target, with the task's prompt template stripped."""
    from .tasks import build_task, task_manager

    tasks = list(tasks)
    if not tasks:
        return []  # no need to build lm-eval's task index
    manager = task_manager(tuple(sorted({spec.name for spec in tasks})))
    references = []
    for spec in tasks:
        task = build_task(manager, spec)
        docs = list(task.eval_docs)
        questions = _strip_common_affixes([words(str(task.doc_to_text(doc))) for doc in docs])
        for index, (doc, question) in enumerate(zip(docs, questions, strict=True)):
            if task.OUTPUT_TYPE == "multiple_choice":
                answers = [words(str(choice)) for choice in task.doc_to_choice(doc)]
            else:
                answers = [words(str(task.doc_to_target(doc)))]
            label = f"{spec.name}#{index}"
            references.append((label, question))
            references += [(label, question + answer) for answer in answers]
    return references


def contaminated(rows: list[dict[str, Any]], references: list[tuple[str, list[str]]], n: int) -> dict[str, dict[str, Any]]:
    """Rows whose content contains a word n-gram of a reference, or a whole reference shorter than n words."""
    index: dict[int, dict[tuple[str, ...], str]] = {}
    for label, tokens in references:
        if len(tokens) < MIN_REFERENCE_WORDS:
            continue
        size = min(n, len(tokens))
        for gram in ngrams(tokens, size):
            index.setdefault(size, {}).setdefault(gram, label)
    removed = {}
    for row in rows:
        tokens = words(_content(row))
        hits = sorted(g for size, grams in index.items() if len(tokens) >= size for g in ngrams(tokens, size) if g in grams)
        if hits:
            gram = hits[0]
            removed[row["id"]] = {"match": index[len(gram)][gram], "ngram": " ".join(gram)}
    return removed


def mix(rows: list[dict[str, Any]], weight: float | None, seed: str, split: SplitSettings) -> list[dict[str, Any]]:
    """A fraction (<= 1) or a row count (an integer > 1) of the rows, seeded; a count above the rows
    available upsamples.

    Copies are drawn from training rows only and keep their `source_id`, hence their split: a copy
    of a held-out row would count twice in exact match and validation loss.
    """
    if weight is None or weight == 1:
        return rows
    rng = random.Random(seed)
    count = round(weight * len(rows)) if weight <= 1 else int(weight)
    if count <= len(rows):
        keep = sorted(rng.sample(range(len(rows)), count))
        return [rows[i] for i in keep]
    train = [i for i, row in enumerate(rows) if row_split(row, split) == "train"]
    if not train:
        log.warning("no training row to upsample among %d rows: weight %s ignored", len(rows), weight)
        return rows
    extra = [rng.choice(train) for _ in range(count - len(rows))]
    copies = Counter()
    upsampled = list(rows)
    for i in extra:
        copies[i] += 1
        upsampled.append({**rows[i], "id": f"{rows[i]['id']}#copy{copies[i]}"})
    return upsampled


def filter_and_mix(
    hydrated_paths: list[str | Path],
    weights: dict[str, float | None],
    out_path: str | Path,
    stats_path: str | Path,
    removed_path: str | Path,
    settings: FilterSettings,
    split: SplitSettings,
    eval_tasks: list[Any] | None = None,
) -> dict[str, Any]:
    """Filter the hydrated rows of every dataset together (exact dedup, near dedup, decontamination),
    then mix each dataset (the rows' `dataset`) by its weight."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for path in hydrated_paths:
        for row in read_jsonl(path):
            rows.setdefault(row["dataset"], []).append(row)
    rows = {name: rows[name] for name in sorted(rows)}
    everything = [row for name in rows for row in rows[name]]
    removed: dict[str, dict[str, Any]] = {}
    if settings.exact_dedup:
        removed |= exact_duplicates(everything)
    if settings.near_dedup:
        removed |= near_duplicates(
            [r for r in everything if r["id"] not in removed], settings.near_dedup_threshold, settings.seed
        )
    if settings.decontaminate:
        kept = [r for r in everything if r["id"] not in removed]
        references = eval_references(eval_tasks or [])
        for row_id, hit in contaminated(kept, references, settings.ngram).items():
            removed[row_id] = {"reason": "eval_contamination", **hit}
        # Train/validation rows that share content with held-out test rows would inflate exact match.
        remaining = [r for r in kept if r["id"] not in removed]
        in_test = [row_split(r, split) == "test" for r in remaining]
        others = [r for r, test in zip(remaining, in_test, strict=True) if not test]
        held_out = [(r["id"], words(_content(r))) for r, test in zip(remaining, in_test, strict=True) if test]
        for row_id, hit in contaminated(others, held_out, settings.ngram).items():
            removed[row_id] = {"reason": "test_overlap", **hit}

    reasons = ("exact_duplicate", "near_duplicate", "eval_contamination", "test_overlap")
    stats: dict[str, Any] = {"datasets": {}, "settings": {**asdict(settings), "eval_tasks": [t.name for t in eval_tasks or []]}}
    mixed = []
    for name, dataset_rows in rows.items():
        kept = [r for r in dataset_rows if r["id"] not in removed]
        # Seeded per dataset, so two datasets of one size are not sampled at the same positions.
        weighted = mix(kept, weights.get(name), f"{settings.seed}:{name}", split)
        mixed += weighted
        reason_counts = Counter(removed[r["id"]]["reason"] for r in dataset_rows if r["id"] in removed)
        stats["datasets"][name] = {
            "rows_in": len(dataset_rows),
            **{reason: reason_counts.get(reason, 0) for reason in reasons},
            "rows_after_filters": len(kept),
            "weight": weights.get(name),
            "rows_out": len(weighted),
        }
    write_jsonl(removed_path, [{**r, **removed[r["id"]]} for r in everything if r["id"] in removed])
    write_jsonl(out_path, mixed, if_empty=f"{out_path}: every row was filtered out; see {removed_path}")
    write_json(stats_path, stats)
    log.info("filters: %s", {n: (s["rows_in"], s["rows_out"]) for n, s in stats["datasets"].items()})
    return stats
