"""Deduplication: exact (the same words) and near (MinHash LSH over word 5-shingles, each candidate
pair checked against the threshold on its MinHashes)."""

from __future__ import annotations

import functools
import hashlib
import os
from array import array
from pathlib import Path
from typing import Any

from .io import Progress
from .words import ngrams, words

NUM_PERM = 128
CANDIDATE_MARGIN = 0.15


def lsh_bands(threshold: float) -> list[tuple[int, int]]:
    """The LSH bands (start and end of each in a MinHash's values) that make near-dedup candidates.

    Bands tuned for a lower threshold find nearly every pair at the real one (97% at 0.85, 99.9% at
    0.9, where bands tuned for 0.85 find 80%); comparing the candidates' MinHashes then keeps the
    pairs whose estimated Jaccard reaches the threshold.
    """
    from datasketch import MinHashLSH

    return MinHashLSH(threshold=max(0.5, threshold - CANDIDATE_MARGIN), num_perm=NUM_PERM).hashranges


def digest(text: str) -> int:
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
    band_keys = [digest(values[start:end].tobytes().hex()) for start, end in bands]
    return digest(" ".join(tokens)), band_keys, values.tobytes()


@functools.cache
def _permutations(seed: int):
    """The MinHash permutations of `seed` (and their scheme), drawn once per process instead of once per row."""
    from datasketch import MinHash

    drawn = MinHash(num_perm=NUM_PERM, seed=seed)
    return {"permutations": drawn.permutations, "scheme": drawn.scheme}


def sign_rows(contents: list[str], bands: list[tuple[int, int]], seed: int) -> list[tuple[int, list[int], bytes]]:
    return [_signature(content, bands, seed) for content in contents]


def exact_duplicates(keys: array, ids: list[str]) -> dict[int, dict[str, Any]]:
    """Row -> removal record for every row whose words (their digest, `keys`) were seen before."""
    first: dict[int, int] = {}
    removed = {}
    for index, key in enumerate(keys):
        if key in first:
            removed[index] = {"reason": "exact_duplicate", "match": ids[first[key]]}
        else:
            first[key] = index
    return removed


def near_duplicates(
    ids: list[str],
    sources: array,
    band_keys: array,
    removed: dict[int, dict[str, Any]],
    signatures: Path,
    threshold: float,
) -> dict[int, dict[str, Any]]:
    """MinHash LSH over word 5-shingles: a row whose MinHash agrees with an earlier kept row's, met in
    one of its bands' buckets, on at least `threshold` of the values (the estimated Jaccard) goes.
    `sources` holds each row's digest of its `source_id`, `band_keys` its band keys, row after row.

    Rows of one conversation are never each other's duplicates: each turn's content holds the
    history before it, so a short late turn looks like the turn before it. The bands' buckets are
    numbered once, so what is kept per bucket is an array of row numbers, not a dict of keys; the
    MinHash values stay on disk (`signatures`, one row of NUM_PERM uint32 after another) and are
    read for the rows that meet candidates only (read, not mapped: mapped pages would count as the
    stage's memory).
    """
    import numpy as np

    if not ids:
        return {}
    size = NUM_PERM * 4
    with open(signatures, "rb") as handle:

        def minhash(row: int) -> np.ndarray:
            return np.frombuffer(os.pread(handle.fileno(), size, row * size), dtype=np.uint32)

        bands = np.frombuffer(band_keys, dtype=np.int64).reshape(len(ids), -1)
        buckets = [np.unique(bands[:, b], return_inverse=True)[1] for b in range(bands.shape[1])]
        first_kept = [np.full(int(bucket.max()) + 1, -1, dtype=np.int64) for bucket in buckets]
        more_kept: dict[tuple[int, int], list[int]] = {}  # the other kept rows of a bucket
        near = {}
        progress = Progress("filters: near-dedup", len(ids))
        for row in range(len(ids)):
            progress.update()
            if row in removed:
                continue
            candidates = set()
            for b, bucket in enumerate(buckets):
                if (first := first_kept[b][bucket[row]]) >= 0:
                    candidates.add(int(first))
                    candidates.update(more_kept.get((b, int(bucket[row])), ()))
            others = [k for k in candidates if sources[k] != sources[row]]
            mine = minhash(row) if others else None
            close = [ids[k] for k in others if np.count_nonzero(minhash(k) == mine) >= threshold * NUM_PERM]
            if close:
                near[row] = {"reason": "near_duplicate", "match": min(close)}
                continue
            for b, bucket in enumerate(buckets):
                if first_kept[b][bucket[row]] < 0:
                    first_kept[b][bucket[row]] = row
                else:
                    more_kept.setdefault((b, int(bucket[row])), []).append(row)
    return near
