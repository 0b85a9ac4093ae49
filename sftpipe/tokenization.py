"""Tokenize-and-split stage: hydrated JSONL to train/validation/test token JSONL with masked labels,
or, for preference pairs, with the prompt's and each reply's token ids."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io import (
    PipelineError,
    Progress,
    batched,
    count_jsonl_rows,
    jsonl_writer,
    read_jsonl,
    read_jsonl_files,
    sha256_file,
    write_json,
)
from .model import WEIGHT_SUFFIXES, load_tokenizer
from .splits import SplitSettings, row_split

log = logging.getLogger("sftpipe")

IGNORE_INDEX = -100
SPLITS = ("train", "validation", "test")
BATCH = 8192  # rows per tokenizer call: large batches keep every core busy
HISTOGRAM_BINS = 32
PREVIEW_ROWS = 3  # training rows per dataset shown as the model sees and learns them


OVERLONG = ("truncate", "drop")  # what happens to a row over max_length


@dataclass(frozen=True)
class LengthSettings:
    max_length: int = 512
    min_tokens: int = 1
    overlong: str = "truncate"  # one of OVERLONG


def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids straight from the Rust tokenizer when there is one: the same ids as `tokenizer(texts)`
    without building offsets and Python encodings we would throw away."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]


def _leading_special_tokens(tokenizer) -> list[int]:
    with_special, plain = (_encode(tokenizer, ["x"], add_special_tokens=flag)[0] for flag in (True, False))
    start = next(i for i in range(len(with_special) - len(plain) + 1) if with_special[i : i + len(plain)] == plain)
    return with_special[:start]


def prompt_token_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """The token ids of prompts as training sees them, and generation too: the tokens the tokenizer
    puts before any text (a BOS, for Llama-style tokenizers) unless the prompt already starts with
    them, as a chat template's output does (never a double BOS), then the text's own. Tokens it
    appends (an EOS, with `add_eos_token`) have no place after a prompt."""
    ids = _encode(tokenizer, prompts, add_special_tokens=False)
    lead = _leading_special_tokens(tokenizer)
    if not lead:
        return ids
    lead_text = tokenizer.decode(lead)
    return [row if text.startswith(lead_text) else lead + row for row, text in zip(ids, prompts, strict=True)]


def encode_rows(rows: list[dict[str, Any]], tokenizer, max_length: int) -> list[dict[str, Any] | None]:
    """Token ids and labels per row (prompt labels -100, EOS ending every completion and learned);
    `None` for a row whose prompt leaves no room for its completion.

    Prompt and completion are tokenized separately and joined, so the mask never depends on finding
    a template string in the token stream.
    """
    prompts = prompt_token_ids(tokenizer, [r["prompt"] for r in rows])
    completions = _encode(tokenizer, [r["completion"] for r in rows], add_special_tokens=False)
    eos = tokenizer.eos_token_id
    out: list[dict[str, Any] | None] = []
    for row, prompt_ids, completion_ids in zip(rows, prompts, completions, strict=True):
        n_prompt = len(prompt_ids)
        if n_prompt >= max_length:
            out.append(None)
            continue
        truncated = n_prompt + len(completion_ids) + 1 > max_length
        # A cut completion loses its EOS with its end: the model must not learn to stop mid-answer.
        completion_ids.append(eos)
        learned = completion_ids[: max_length - n_prompt]
        # `content` served the filters; the token artifacts keep what training and evaluation read.
        encoded = {k: v for k, v in row.items() if k != "content"}
        encoded["input_ids"] = prompt_ids + learned
        encoded["labels"] = [IGNORE_INDEX] * n_prompt + learned
        encoded["completion_tokens"] = len(learned)
        encoded["truncated"] = truncated
        encoded["sequence_tokens"] = [len(encoded["input_ids"])]
        out.append(encoded)
    return out


def encode_pairs(rows: list[dict[str, Any]], tokenizer, max_length: int) -> list[dict[str, Any] | None]:
    """`prompt_ids`, `chosen_ids` and `rejected_ids` per preference row: each reply encoded after the
    prompt exactly as `encode_rows` encodes a completion (its EOS learned, cut at `max_length`);
    `None` for a row whose prompt leaves no room for a reply."""
    encoded = {
        reply: encode_rows([{**row, "completion": row[reply]} for row in rows], tokenizer, max_length)
        for reply in ("chosen", "rejected")
    }
    out: list[dict[str, Any] | None] = []
    for row, chosen, rejected in zip(rows, encoded["chosen"], encoded["rejected"], strict=True):
        if chosen is None:  # the prompt alone fills max_length, for both replies
            out.append(None)
            continue
        n_prompt = chosen["labels"].count(IGNORE_INDEX)
        pair = {k: v for k, v in row.items() if k != "content"}
        pair["prompt_ids"] = chosen["input_ids"][:n_prompt]
        pair["chosen_ids"] = chosen["input_ids"][n_prompt:]
        pair["rejected_ids"] = rejected["input_ids"][n_prompt:]
        pair["completion_tokens"] = chosen["completion_tokens"] + rejected["completion_tokens"]
        pair["truncated"] = chosen["truncated"] or rejected["truncated"]
        pair["sequence_tokens"] = chosen["sequence_tokens"] + rejected["sequence_tokens"]
        out.append(pair)
    return out


def _counters() -> dict[str, Any]:
    return {
        "rows_in": 0,
        "rows": 0,
        "tokens": 0,
        "completion_tokens": 0,
        "truncated": 0,
        "dropped_too_long": 0,
        "dropped_too_short": 0,
        "length_histogram": {},
    }


def _collect(
    batch: list[dict[str, Any]],
    encoded_batch: list[dict[str, Any] | None],
    seen: set[str],
    stats: dict[str, Any],
    writers: dict[str, Callable[[dict[str, Any]], object]],
    lengths: LengthSettings,
    split: SplitSettings,
    bin_width: int,
    preview: dict[str, list[dict[str, Any]]],
) -> None:
    """Apply the length filters and the split to one encoded batch, counting per split and per
    dataset within it, and write each kept row to its split; keep the first training rows of each
    dataset for the preview."""
    for row, encoded in zip(batch, encoded_batch, strict=True):
        if row["id"] in seen:
            raise PipelineError(f"dataset '{row['dataset']}': row id '{row['id']}' appears twice")
        seen.add(row["id"])
        split_name = row_split(row, split)
        datasets = stats[split_name]["datasets"]
        counts = (stats[split_name], datasets.setdefault(row["dataset"], _counters()))
        for c in counts:
            c["rows_in"] += 1
        if encoded is None or (encoded["truncated"] and lengths.overlong == "drop"):
            for c in counts:
                c["dropped_too_long"] += 1
            continue
        sequences = encoded.pop("sequence_tokens")  # a pair's two sequences share its fate
        if min(sequences) < lengths.min_tokens:
            for c in counts:
                c["dropped_too_short"] += 1
            continue
        n_tokens = sum(sequences)
        bin_start = str(n_tokens // bin_width * bin_width)
        completion_tokens, truncated = encoded.pop("completion_tokens"), encoded.pop("truncated")
        for c in counts:
            c["rows"] += 1
            c["tokens"] += n_tokens
            c["completion_tokens"] += completion_tokens
            c["truncated"] += truncated
            c["length_histogram"][bin_start] = c["length_histogram"].get(bin_start, 0) + 1
        if split_name == "train" and len(preview.setdefault(row["dataset"], [])) < PREVIEW_ROWS:
            preview[row["dataset"]].append(encoded)
        writers[split_name](encoded)


def learned_segments(tokenizer, row: dict[str, Any]) -> list[dict[str, Any]]:
    """A tokenized row as text in runs of tokens the model sees (prompt) and learns (completion and
    EOS), decoded with special tokens shown: what training is fed, as the report shows it."""
    if "chosen_ids" in row:  # a preference pair shows its prompt and the chosen reply
        return [
            {"learned": False, "text": tokenizer.decode(row["prompt_ids"])},
            {"learned": True, "text": tokenizer.decode(row["chosen_ids"])},
        ]
    segments: list[dict[str, Any]] = []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        learned = label != IGNORE_INDEX
        if segments and segments[-1]["learned"] == learned:
            segments[-1]["ids"].append(token)
        else:
            segments.append({"learned": learned, "ids": [token]})
    return [{"learned": s["learned"], "text": tokenizer.decode(s["ids"])} for s in segments]


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause CPython's cyclic GC: every token list allocated would otherwise trigger rescans of all
    the rows kept so far (a sixth of the stage's time on Alpaca), and token rows form no cycles.
    Loading the tokenizer's vocabulary JSON pays the same rescans."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _check_splits(stats: dict[str, Any], split: SplitSettings) -> None:
    """A held-out split the config asks for must hold rows: a tiny dataset can hash none into it."""
    total = sum(stats[name]["rows"] for name in SPLITS)
    for name, fraction in (("validation", split.validation_fraction), ("test", split.test_fraction)):
        if fraction > 0 and total and stats[name]["rows"] == 0:
            raise PipelineError(
                f"config key 'data.split.{name}_fraction': of {total} rows kept, none fell into the {name} split "
                f"(each row's split is drawn from a hash of its id, a {fraction:.0%} chance); add rows or raise the "
                "fraction, or set it to 0 to go without"
            )


# The code the token ids come from: this module, the split rule, the tokenizer loading and the artifact writing.
FINGERPRINTED_CODE = ("tokenization.py", "splits.py", "model.py", "io.py")


def fingerprint(
    tokenizer_dir: str | Path, data_paths: list[str | Path], settings: dict[str, Any], code_dir: Path = Path(__file__).parent
) -> str:
    """Content hash of everything the token ids depend on: every tokenizer and config file of the
    model directory (weights aside), the data (which embeds the template text), the code and the
    settings. Never a file name outside the model directory, never an mtime."""
    digest = hashlib.sha256()
    for path in sorted(Path(tokenizer_dir).iterdir()):
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES:
            digest.update(path.name.encode() + sha256_file(path).encode())
    for path in data_paths:
        digest.update(sha256_file(path).encode())
    for module in FINGERPRINTED_CODE:
        digest.update((code_dir / module).read_bytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


@_gc_paused()
def tokenize_and_split(
    hydrated_paths: list[str | Path],
    tokenizer_dir: str | Path,
    out_paths: dict[str, str | Path],
    stats_path: str | Path,
    lengths: LengthSettings,
    split: SplitSettings,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Write one token JSONL per split (`out_paths[split]`) and the stats; return the stats. Preference
    pairs (rows with `chosen` and `rejected` replies) are encoded by `encode_pairs`, their token counts
    and histogram over both sequences."""
    if lengths.overlong not in OVERLONG:
        raise PipelineError(f"config key 'data.overlong': '{lengths.overlong}' is not one of {', '.join(OVERLONG)}")
    max_length = lengths.max_length
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise PipelineError(f"{tokenizer_dir}: the tokenizer's pad token must exist and differ from EOS")
    total = count_jsonl_rows(hydrated_paths)
    progress = Progress("tokenize", total)
    stats: dict[str, Any] = {split_name: {**_counters(), "datasets": {}} for split_name in SPLITS}
    pairs = "chosen" in next(read_jsonl(hydrated_paths[0]), {})
    encode = encode_pairs if pairs else encode_rows
    bin_width = max(1, max_length * (2 if pairs else 1) // HISTOGRAM_BINS)
    seen: set[str] = set()
    # Rows stream to their split files batch by batch: memory stays one batch, not the dataset.
    with contextlib.ExitStack() as stack:
        writers = {name: stack.enter_context(jsonl_writer(out_paths[name])) for name in SPLITS}
        preview: dict[str, list[dict[str, Any]]] = {}
        for batch in batched(read_jsonl_files(hydrated_paths), BATCH):
            _collect(batch, encode(batch, tokenizer, max_length), seen, stats, writers, lengths, split, bin_width, preview)
            progress.update(len(batch))
        _check_splits(stats, split)
    stats["preview"] = {name: [learned_segments(tokenizer, row) for row in rows] for name, rows in sorted(preview.items())}
    stats["settings"] = {
        "max_length": max_length,
        "min_tokens": lengths.min_tokens,
        "overlong": lengths.overlong,
        "histogram_bin_width": bin_width,
        "validation_fraction": split.validation_fraction,
        "test_fraction": split.test_fraction,
        "seed": split.seed,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
    }
    stats["fingerprint"] = fingerprint(tokenizer_dir, hydrated_paths, stats["settings"])
    write_json(stats_path, stats)
    log.info("tokenized: %s", {name: stats[name]["rows"] for name in SPLITS})
    return stats
