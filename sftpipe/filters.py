"""Filter-and-mix stage: dedup (`sftpipe.dedup`), decontamination (`sftpipe.decontamination`) and
mixing (`sftpipe.mixing`) of the hydrated datasets of an experiment, in three passes over the rows.

Every removed row is written with its reason and what it matched, so a user can check the filters.
"""

from __future__ import annotations

import itertools
import logging
import sys
import tempfile
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .decontamination import NgramIndex, eval_references
from .dedup import digest, exact_duplicates, lsh_bands, near_duplicates, sign_rows
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
from .mixing import copies, mix_plan
from .splits import SplitSettings, row_split
from .words import row_content, words

log = logging.getLogger("sftpipe")

BATCH = 2048  # rows a worker signs at a time


@dataclass(frozen=True)
class FilterSettings:
    """The `data.filters` config section, key for key."""

    exact_dedup: bool = True
    near_dedup: bool = True
    near_dedup_threshold: float = 0.85
    decontaminate: bool = True
    ngram: int = 13  # as in GPT-3's decontamination
    seed: int = 0


def _dataset_paths(hydrated_paths: list[str | Path]) -> list[Path]:
    """The hydrated files in the order of their datasets' names (each file holds one dataset)."""

    def dataset(path: Path) -> str:
        first = next(read_jsonl(path), None)
        return first["dataset"] if first else ""

    return sorted((Path(p) for p in hydrated_paths), key=dataset)


class _Scan:
    """The first pass over the rows: a few numbers a row (never the rows themselves), the
    evaluation contamination found, and the held-out rows' words for the test-overlap index."""

    def __init__(self, settings: FilterSettings, split: SplitSettings, references: NgramIndex) -> None:
        self.settings, self.split, self.references = settings, split, references
        self.bands = lsh_bands(settings.near_dedup_threshold)
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
                pending.append((batch, pool.submit(sign_rows, [row_content(r) for r in batch], self.bands, self.settings.seed)))
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
            self.sources.append(digest(row.get("source_id", row["id"])))
            self.exact.append(key)
            self.band_keys.extend(keys)
            self.signatures.write(values)
            if self.settings.decontaminate:
                tokens = words(row_content(row))
                if self.references and (hit := self.references.match(tokens)):
                    self.contamination[index] = hit
                if self.splits[-1] == "test":
                    self.test_words[index] = " ".join(tokens)


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
    others = (
        (r["id"], words(row_content(r))) for path in held_out_paths for r in read_jsonl(path) if row_split(r, split) == "test"
    )
    held_out = NgramIndex(itertools.chain(own, others), n, hashed=True)
    overlap = {}
    if not held_out:
        return overlap
    progress = Progress("filters: test overlap", len(scan.ids))
    for index, row in enumerate(read_jsonl_files(paths)):
        progress.update()
        if index not in removed and scan.splits[index] != "test" and (hit := held_out.match(words(row_content(row)))):
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
        removed: dict[int, dict[str, Any]] = exact_duplicates(scan.exact, scan.ids) if settings.exact_dedup else {}
        if settings.near_dedup:
            removed |= near_duplicates(scan.ids, scan.sources, scan.band_keys, removed, signatures, settings.near_dedup_threshold)
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
                written += _write_copies(write, plans.get(dataset), saved)
                dataset = row["dataset"]
            if index in removed:
                write_removed({**row, **removed[index]})
            elif index in plans[dataset][0]:
                write(row)
                written += 1
            if index in copied:
                saved[index] = row
        written += _write_copies(write, plans.get(dataset), saved)
        if not written:
            raise PipelineError(f"{out_path}: every row was filtered out; see {removed_path}")


def _write_copies(write, plan, saved: dict[int, dict[str, Any]]) -> int:
    if plan is None:
        return 0
    for row in copies(saved, plan[1]):
        write(row)
    return len(plan[1])
