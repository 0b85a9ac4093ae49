"""Mixing: which of a dataset's kept rows the mixture holds, and the copies that upsample it."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger("sftpipe")


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


def copies(rows: Mapping[int, dict[str, Any]], extra: list[int]) -> Iterator[dict[str, Any]]:
    """The copies `mix_plan` adds, of `rows` (by index), in its order: the k-th copy of a row is
    named `<id>#copy<k>`, so every id stays unique."""
    made: Counter[int] = Counter()
    for index in extra:
        made[index] += 1
        yield {**rows[index], "id": f"{rows[index]['id']}#copy{made[index]}"}
