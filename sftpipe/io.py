"""Artifact I/O: every file or directory a stage writes appears whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("sftpipe")


class PipelineError(Exception):
    """A user-facing error: the message names the file, line or config key at fault."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds.

    Works for files and directories: the caller decides what it writes at the yielded path. What a
    killed writer of the same path left behind (`.<name>.tmp-<pid>...`) is removed first: Snakemake
    runs one job per output at a time, so no other writer of `path` is alive.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = final.with_name(f"{temporary_prefix(final)}{os.getpid()}")
    try:
        yield tmp
        if final.is_dir() and tmp.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        _remove(tmp)


def temporary_prefix(final: Path, purpose: str = "tmp") -> str:
    """The name every temporary file or directory written for `final` starts with: `tmp` for what
    becomes `final`, another `purpose` for a stage's scratch space beside it."""
    return f".{final.name}.{purpose}-"


def remove_stale_temporaries(final: Path, purpose: str = "tmp") -> None:
    for stale in final.parent.glob(f"{temporary_prefix(final, purpose)}*"):
        log.info("removing %s, left by a writer of %s that did not finish", stale, final.name)
        _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def jsonl_line(obj: Any) -> bytes:
    """Canonical JSON and its newline: sorted keys and raw UTF-8, so equal data gives equal bytes
    (orjson: token id lists dominate the data artifacts, and the stdlib encoder was a third of
    tokenization time)."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, ensure_ascii=False, sort_keys=True, indent=2) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextlib.contextmanager
def jsonl_writer(path: str | os.PathLike) -> Iterator[Callable[[dict[str, Any]], object]]:
    """Yield a function that appends one row to `path`, which appears whole when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        yield lambda row: handle.write(jsonl_line(row))


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]], *, if_empty: str | None = None) -> int:
    """Write rows atomically, one canonical JSON object per line; return the row count.

    With `if_empty`, writing no row is an error with that message, and nothing is left at `path`.
    """
    count = 0
    with jsonl_writer(path) as write:
        for row in rows:
            write(row)
            count += 1
        if count == 0 and if_empty is not None:
            raise PipelineError(if_empty)
    return count


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yield the objects of a JSONL file; a bad line raises an error naming file and line."""
    return (row for _, row in numbered_jsonl(path))


def read_jsonl_files(paths: Iterable[str | os.PathLike]) -> Iterator[dict[str, Any]]:
    """The objects of several JSONL files, one file after the other."""
    for path in paths:
        yield from read_jsonl(path)


def count_jsonl_rows(paths: Iterable[str | os.PathLike]) -> int:
    """The non-blank lines of JSONL files: a stage's row count for its progress, without parsing."""
    total = 0
    for path in paths:
        with open(path, "rb") as handle:
            total += sum(1 for line in handle if line.strip())
    return total


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of `size` items in order, the last one shorter (itertools.batched needs Python 3.12)."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def numbered_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file."""
    path = Path(path)
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                row = orjson.loads(raw)
            except orjson.JSONDecodeError as err:
                # Re-parse with the stdlib for its readable reason and column: the line alone, since
                # with its newline an unfinished object's error lands on the line after it.
                try:
                    json.loads(raw.decode("utf-8").rstrip("\r\n"))
                except UnicodeDecodeError as utf8:
                    raise PipelineError(f"{path}:{lineno}: not valid UTF-8 ({utf8.reason} at byte {utf8.start})") from None
                except json.JSONDecodeError as detail:
                    raise PipelineError(f"{path}:{lineno}:{detail.colno}: malformed JSON ({detail.msg})") from None
                raise PipelineError(f"{path}:{lineno}: malformed JSON ({err})") from None
            if not isinstance(row, dict):
                raise PipelineError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Progress:
    """Log `done/total`, rate and ETA at most every `every` seconds, for long stages' logs. `done`
    counts what an earlier run did (a resumed training's steps): the rate is this run's."""

    def __init__(self, desc: str, total: int | None, every: float = 10.0, unit: str = "item", done: int = 0) -> None:
        self.desc, self.total, self.every, self.unit = desc, total, every, unit
        self.start = self.last = time.monotonic()
        self.done = self.initial = done

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every or (self.total is not None and self.done >= self.total):
            self.last = now
            self._log(now)

    def _log(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = (self.done - self.initial) / elapsed
        # Slow work (a training step of minutes) reads as seconds each, where a rate would round to 0.0/s.
        pace = f"{rate:.1f}/s" if rate >= 1 or not rate else f"{1 / rate:.1f} s/{self.unit}"
        if self.total:
            eta = f"{(self.total - self.done) / rate:.0f}s" if rate else "unknown"
            log.info("%s: %d/%d (%s, ETA %s)", self.desc, self.done, self.total, pace, eta)
        else:
            log.info("%s: %d (%s)", self.desc, self.done, pace)
