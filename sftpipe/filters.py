"""Filter-and-mix stage: dedup, decontamination and mixing of the hydrated datasets of an experiment.

Every removed row is written with its reason and what it matched, so a user can check the filters.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import random
import re
import sys
import tempfile
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .io import (
    PipelineError,
    Progress,
    batched,
    count_jsonl_rows,
    jsonl_writer,
    read_jsonl,
    read_jsonl_files,
    remove_stale_temporaries,
    temporary_prefix,
    write_json,
)
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


class NgramIndex:
    """Word n-grams of reference texts -> the label of the first text holding each: a row holds a
    reference's n-gram, or a whole reference shorter than n words. References shorter than
    MIN_REFERENCE_WORDS are too generic to prove contamination and are left out.

    Every gram is at least MIN_REFERENCE_WORDS long, so grams are found by their first
    MIN_REFERENCE_WORDS words: a row's words are cut into those prefixes once, whatever the grams'
    sizes, and a prefix hit is checked word by word. The index of evaluation documents is a dict (it
    grows with the configured evaluation sets only); `hashed` keeps 64-bit hashes of the prefixes in
    sorted arrays instead, with each reference as one string, for held-out rows, whose number grows
    with the data."""

    def __init__(self, references: Iterable[tuple[str, list[str]]], n: int, hashed: bool = False) -> None:
        self.n, self.hashed = n, hashed
        self.labels: list[str] = []
        self.texts: list[str] = []  # a hashed index's references, their words joined by spaces
        prefixes: dict[tuple[str, ...], list[tuple[tuple[str, ...], int]]] = {}
        owner_of: dict[tuple[str, ...], int] = {}
        hashes, owners, starts = array("q"), array("i"), array("i")
        for label, tokens in references:
            if len(tokens) < MIN_REFERENCE_WORDS:
                continue
            owner, size = len(self.labels), min(n, len(tokens))
            self.labels.append(label)
            if hashed:
                self.texts.append(" ".join(tokens))
            for start in range(len(tokens) - size + 1):
                prefix = tuple(tokens[start : start + MIN_REFERENCE_WORDS])
                if hashed:
                    hashes.append(hash(prefix))
                    owners.append(owner)
                    starts.append(start)
                elif (gram := tuple(tokens[start : start + size])) not in owner_of:
                    owner_of[gram] = owner
                    prefixes.setdefault(prefix, []).append((gram, owner))
        if hashed:
            import numpy as np

            order = np.argsort(np.frombuffer(hashes, dtype=np.int64), kind="stable")
            self.keys = np.frombuffer(hashes, dtype=np.int64)[order]
            self.owners = np.frombuffer(owners, dtype=np.int32)[order]
            self.starts = np.frombuffer(starts, dtype=np.int32)[order]
        self.prefixes = prefixes

    def __bool__(self) -> bool:
        return bool(self.labels)

    def _candidates(self, prefixes: list[tuple[str, ...]]) -> Iterator[tuple[int, tuple[str, ...], int]]:
        """(position in the row, gram, reference) for each reference gram starting like the row at a position."""
        if not self.hashed:
            for at, prefix in enumerate(prefixes):
                for gram, owner in self.prefixes.get(prefix, ()):
                    yield at, gram, owner
            return
        import numpy as np

        hashes = np.fromiter(map(hash, prefixes), dtype=np.int64, count=len(prefixes))
        low, high = np.searchsorted(self.keys, hashes, "left"), np.searchsorted(self.keys, hashes, "right")
        for at in np.nonzero(high > low)[0]:
            for j in range(low[at], high[at]):
                tokens = self.texts[self.owners[j]].split(" ")
                start = int(self.starts[j])
                yield int(at), tuple(tokens[start : start + min(self.n, len(tokens))]), int(self.owners[j])

    def match(self, tokens: list[str]) -> dict[str, str] | None:
        """The first (in sorted order) of the reference grams the row holds: its reference's label and the gram."""
        prefixes = [tuple(tokens[i : i + MIN_REFERENCE_WORDS]) for i in range(len(tokens) - MIN_REFERENCE_WORDS + 1)]
        hits = [(gram, owner) for at, gram, owner in self._candidates(prefixes) if tuple(tokens[at : at + len(gram)]) == gram]
        if not hits:
            return None
        gram, owner = min(hits)
        return {"match": self.labels[owner], "ngram": " ".join(gram)}


def mix_plan(splits: list[str], weight: float | None, seed: str) -> tuple[list[int], list[int]]:
    """Which of a dataset's kept rows (their splits, in order) the mixture holds, and which rows it
    adds copies of: a fraction (<= 1) or a row count (an integer > 1) of the rows, seeded; a count
    above the rows available upsamples.

    Copies are drawn from training rows only and keep their `source_id`, hence their split: a copy
    of a held-out row would count twice in exact match and validation loss.
    """
    every = list(range(len(splits)))
    if weight is None or weight == 1:
        return every, []
    rng = random.Random(seed)
    count = round(weight * len(splits)) if weight <= 1 else int(weight)
    if count <= len(splits):
        return sorted(rng.sample(every, count)), []
    train = [i for i, split in enumerate(splits) if split == "train"]
    if not train:
        log.warning("no training row to upsample among %d rows: weight %s ignored", len(splits), weight)
        return every, []
    return every, [rng.choice(train) for _ in range(count - len(splits))]


def mix(rows: list[dict[str, Any]], weight: float | None, seed: str, split: SplitSettings) -> list[dict[str, Any]]:
    """`mix_plan` applied to rows: the kept ones, then the copies, each named `<id>#copy<k>`."""
    keep, extra = mix_plan([row_split(r, split) for r in rows], weight, seed)
    copies: Counter[int] = Counter()
    mixed = [rows[i] for i in keep]
    for i in extra:
        copies[i] += 1
        mixed.append({**rows[i], "id": f"{rows[i]['id']}#copy{copies[i]}"})
    return mixed


def _dataset_paths(hydrated_paths: list[str | Path]) -> list[Path]:
    """The hydrated files in the order of their datasets' names (each file holds one dataset)."""

    def dataset(path: Path) -> str:
        first = next(read_jsonl(path), None)
        return first["dataset"] if first else ""

    return sorted((Path(p) for p in hydrated_paths), key=dataset)


def _digest(text: str) -> int:
    """A 64-bit content digest, the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _signature(content: str, bands: list[tuple[int, int]], seed: int) -> tuple[int, list[int], bytes]:
    """(exact-duplicate key, one key per LSH band, the MinHash values) of the MinHash over a row's
    content's word 5-shingles; a worker process computes these for a batch of rows."""
    from datasketch import MinHash

    tokens = words(content)
    minhash = MinHash(num_perm=NUM_PERM, seed=seed, **_permutations(seed))
    minhash.update_batch([" ".join(g).encode() for g in ngrams(tokens, 5)])
    values = minhash.hashvalues
    band_keys = [_digest(values[start:end].tobytes().hex()) for start, end in bands]
    return _digest(" ".join(tokens)), band_keys, values.tobytes()


@functools.cache
def _permutations(seed: int):
    """The MinHash permutations of `seed` (and their scheme), drawn once per process instead of once per row."""
    from datasketch import MinHash

    drawn = MinHash(num_perm=NUM_PERM, seed=seed)
    return {"permutations": drawn.permutations, "scheme": drawn.scheme}


def _signatures(contents: list[str], bands: list[tuple[int, int]], seed: int) -> list[tuple[int, list[int], bytes]]:
    return [_signature(content, bands, seed) for content in contents]


NUM_PERM = 128
CANDIDATE_MARGIN = 0.15
BATCH = 2048  # rows a worker signs at a time


class _Scan:
    """The first pass over the rows: a few numbers a row (never the rows themselves), the
    evaluation contamination found, and the held-out rows' words for the test-overlap index."""

    def __init__(self, settings: FilterSettings, split: SplitSettings, references: NgramIndex) -> None:
        from datasketch import MinHashLSH

        self.settings, self.split, self.references = settings, split, references
        # Bands tuned for a lower threshold find nearly every pair at the real one (97% at 0.85, 99.9%
        # at 0.9, where bands tuned for 0.85 find 80%); comparing the candidates' MinHashes then keeps
        # the pairs whose estimated Jaccard reaches the threshold.
        candidates = max(0.5, settings.near_dedup_threshold - CANDIDATE_MARGIN)
        self.bands = MinHashLSH(threshold=candidates, num_perm=NUM_PERM).hashranges
        self.ids: list[str] = []
        self.datasets: list[str] = []
        self.splits: list[str] = []
        # 64-bit digests in flat arrays: 8 bytes a number where a list of ints would take 40.
        self.sources = array("q")  # of source_id
        self.exact = array("q")  # of the content's words
        self.band_keys = array("q")  # [rows x bands], row by row
        self.contamination: dict[int, dict[str, str]] = {}
        self.test_words: dict[int, str] = {}  # joined by spaces: a string a row, not a list of strings

    def run(self, paths: list[Path], threads: int, signatures: BinaryIO) -> _Scan:
        """Read every row once; `threads` worker processes compute the MinHash signatures, batch by
        batch and in order, so the result is the same for any number of them. The MinHash values go
        to the `signatures` file, row after row, for near-dedup to compare candidates."""
        import concurrent.futures

        self.signatures = signatures

        progress = Progress("filters: scan", count_jsonl_rows(paths))
        with concurrent.futures.ProcessPoolExecutor(max(1, threads)) as pool:
            pending: list[tuple[list[dict[str, Any]], concurrent.futures.Future]] = []
            for batch in batched(read_jsonl_files(paths), BATCH):
                pending.append((batch, pool.submit(_signatures, [_content(r) for r in batch], self.bands, self.settings.seed)))
                # The workers sign the next batches while this process checks the oldest.
                while len(pending) > max(1, threads):
                    self._take(*pending.pop(0))
                    progress.update(BATCH)
            for batch, future in pending:
                self._take(batch, future)
                progress.update(len(batch))
        return self

    def _take(self, batch: list[dict[str, Any]], future) -> None:
        for row, (key, keys, values) in zip(batch, future.result(), strict=True):
            index = len(self.ids)
            self.ids.append(row["id"])
            self.datasets.append(sys.intern(row["dataset"]))
            self.splits.append(row_split(row, self.split))
            self.sources.append(_digest(row.get("source_id", row["id"])))
            self.exact.append(key)
            self.band_keys.extend(keys)
            self.signatures.write(values)
            if self.settings.decontaminate:
                tokens = words(_content(row))
                if self.references and (hit := self.references.match(tokens)):
                    self.contamination[index] = hit
                if self.splits[-1] == "test":
                    self.test_words[index] = " ".join(tokens)


def _exact_duplicates(scan: _Scan) -> dict[int, dict[str, Any]]:
    """Row -> removal record for every row whose words were seen before."""
    first: dict[int, int] = {}
    removed = {}
    for index, key in enumerate(scan.exact):
        if key in first:
            removed[index] = {"reason": "exact_duplicate", "match": scan.ids[first[key]]}
        else:
            first[key] = index
    return removed


def _near_duplicates(
    scan: _Scan, removed: dict[int, dict[str, Any]], signatures: Path, threshold: float
) -> dict[int, dict[str, Any]]:
    """MinHash LSH over word 5-shingles: a row whose MinHash agrees with an earlier kept row's, met in
    one of its bands' buckets, on at least `threshold` of the values (the estimated Jaccard) goes.

    Rows of one conversation are never each other's duplicates: each turn's content holds the
    history before it, so a short late turn looks like the turn before it. The bands' buckets are
    numbered once, so what is kept per bucket is an array of row numbers, not a dict of keys; the
    MinHash values stay on disk (`signatures`, one row of NUM_PERM uint32 after another) and are
    read for the rows that meet candidates only (read, not mapped: mapped pages would count as the
    stage's memory).
    """
    import numpy as np

    if not scan.ids:
        return {}
    size = NUM_PERM * 4
    with open(signatures, "rb") as handle:

        def minhash(row: int) -> np.ndarray:
            return np.frombuffer(os.pread(handle.fileno(), size, row * size), dtype=np.uint32)

        bands = np.frombuffer(scan.band_keys, dtype=np.int64).reshape(len(scan.ids), len(scan.bands))
        buckets = [np.unique(bands[:, b], return_inverse=True)[1] for b in range(bands.shape[1])]
        first_kept = [np.full(int(bucket.max()) + 1, -1, dtype=np.int64) for bucket in buckets]
        more_kept: dict[tuple[int, int], list[int]] = {}  # the other kept rows of a bucket
        near = {}
        progress = Progress("filters: near-dedup", len(scan.ids))
        for row in range(len(scan.ids)):
            progress.update()
            if row in removed:
                continue
            candidates = set()
            for b, bucket in enumerate(buckets):
                if (first := first_kept[b][bucket[row]]) >= 0:
                    candidates.add(int(first))
                    candidates.update(more_kept.get((b, int(bucket[row])), ()))
            others = [k for k in candidates if scan.sources[k] != scan.sources[row]]
            mine = minhash(row) if others else None
            close = [scan.ids[k] for k in others if np.count_nonzero(minhash(k) == mine) >= threshold * NUM_PERM]
            if close:
                near[row] = {"reason": "near_duplicate", "match": min(close)}
                continue
            for b, bucket in enumerate(buckets):
                if first_kept[b][bucket[row]] < 0:
                    first_kept[b][bucket[row]] = row
                else:
                    more_kept.setdefault((b, int(bucket[row])), []).append(row)
    return near


def _test_overlap(
    paths: list[Path],
    scan: _Scan,
    removed: dict[int, dict[str, Any]],
    n: int,
    split: SplitSettings,
    held_out_paths: Iterable[str | Path] = (),
) -> dict[int, dict[str, Any]]:
    """Train and validation rows sharing content with a held-out test row would inflate exact match:
    a second pass checks them against the remaining test rows' n-grams, and those of the test rows
    of `held_out_paths` (another stage's data: preference pairs are checked against their SFT's)."""
    own = ((scan.ids[i], text.split(" ")) for i, text in sorted(scan.test_words.items()) if i not in removed)
    others = ((r["id"], words(_content(r))) for path in held_out_paths for r in read_jsonl(path) if row_split(r, split) == "test")
    held_out = NgramIndex(itertools.chain(own, others), n, hashed=True)
    overlap = {}
    if not held_out:
        return overlap
    progress = Progress("filters: test overlap", len(scan.ids))
    for index, row in enumerate(read_jsonl_files(paths)):
        progress.update()
        if index not in removed and scan.splits[index] != "test" and (hit := held_out.match(words(_content(row)))):
            overlap[index] = {"reason": "test_overlap", **hit}
    return overlap


def filter_and_mix(
    hydrated_paths: list[str | Path],
    weights: dict[str, float | None],
    out_path: str | Path,
    stats_path: str | Path,
    removed_path: str | Path,
    settings: FilterSettings,
    split: SplitSettings,
    eval_tasks: list[Any] | None = None,
    threads: int = 1,
    held_out_paths: list[str | Path] = (),
) -> dict[str, Any]:
    """Filter the hydrated rows of every dataset together (exact dedup, near dedup, decontamination),
    then mix each dataset (the rows' `dataset`) by its weight. The test rows of `held_out_paths`
    (preference data is filtered against its SFT data's) count as held-out rows too.

    Memory stays a few numbers a row whatever the number of rows: the rows are read three times
    (scan, test overlap, writing) rather than held, and `threads` processes compute the MinHashes.
    """
    paths = _dataset_paths(hydrated_paths)
    references = NgramIndex(eval_references(eval_tasks or []) if settings.decontaminate else [], settings.ngram)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out, "scratch")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=temporary_prefix(out, "scratch")) as scratch:
        signatures = Path(scratch) / "minhash.u32"
        with signatures.open("wb") as f:
            scan = _Scan(settings, split, references).run(paths, threads, f)
        removed: dict[int, dict[str, Any]] = _exact_duplicates(scan) if settings.exact_dedup else {}
        if settings.near_dedup:
            removed |= _near_duplicates(scan, removed, signatures, settings.near_dedup_threshold)
    if settings.decontaminate:
        removed |= {i: {"reason": "eval_contamination", **hit} for i, hit in scan.contamination.items() if i not in removed}
        removed |= _test_overlap(paths, scan, removed, settings.ngram, split, held_out_paths)

    # Each dataset's mixture: the rows kept, then the copies upsampling adds.
    rows_of: dict[str, list[int]] = {}
    for index, name in enumerate(scan.datasets):
        rows_of.setdefault(name, []).append(index)
    plans = {}
    for name, indices in rows_of.items():
        kept = [i for i in indices if i not in removed]
        # Seeded per dataset, so two datasets of one size are not sampled at the same positions.
        keep, extra = mix_plan([scan.splits[i] for i in kept], weights.get(name), f"{settings.seed}:{name}")
        plans[name] = ({kept[i] for i in keep}, [kept[i] for i in extra])
    _write(paths, scan, removed, plans, out_path, removed_path)

    reasons = ("exact_duplicate", "near_duplicate", "eval_contamination", "test_overlap")
    stats: dict[str, Any] = {"datasets": {}, "settings": {**asdict(settings), "eval_tasks": [t.name for t in eval_tasks or []]}}
    for name, indices in rows_of.items():
        counts = Counter(removed[i]["reason"] for i in indices if i in removed)
        stats["datasets"][name] = {
            "rows_in": len(indices),
            **{reason: counts.get(reason, 0) for reason in reasons},
            "rows_after_filters": len(indices) - sum(counts.values()),
            "weight": weights.get(name),
            "rows_out": len(plans[name][0]) + len(plans[name][1]),
        }
    write_json(stats_path, stats)
    log.info("filters: %s", {n: (s["rows_in"], s["rows_out"]) for n, s in stats["datasets"].items()})
    return stats


def _write(paths, scan: _Scan, removed, plans, out_path, removed_path) -> None:
    """The last pass: each dataset's mixture (its kept rows in order, then its copies) and the removed rows."""
    copied = {i for _, extra in plans.values() for i in extra}
    saved: dict[int, dict[str, Any]] = {}  # rows to copy, until their dataset's end
    written = 0
    with jsonl_writer(out_path) as write, jsonl_writer(removed_path) as write_removed:
        dataset = None
        for index, row in enumerate(read_jsonl_files(paths)):
            if row["dataset"] != dataset:
                written += _copies(write, plans.get(dataset), saved)
                dataset = row["dataset"]
            if index in removed:
                write_removed({**row, **removed[index]})
            elif index in plans[dataset][0]:
                write(row)
                written += 1
            if index in copied:
                saved[index] = row
        written += _copies(write, plans.get(dataset), saved)
        if not written:
            raise PipelineError(f"{out_path}: every row was filtered out; see {removed_path}")


def _copies(write, plan, saved: dict[int, dict[str, Any]]) -> int:
    if plan is None:
        return 0
    counts: Counter[int] = Counter()
    for index in plan[1]:
        counts[index] += 1
        write({**saved[index], "id": f"{saved[index]['id']}#copy{counts[index]}"})
    return len(plan[1])
