"""The split rule: which of train, validation and test a row belongs to, from its id alone. The
filters (test overlap, upsampling from training rows only) and tokenization both apply it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SplitSettings:
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    seed: int = 0


def assign_split(row_id: str, settings: SplitSettings) -> str:
    """Hash the id, not the position, so appending rows never moves existing rows between splits."""
    bucket = int(hashlib.sha256(f"{settings.seed}:{row_id}".encode()).hexdigest()[:12], 16) / 16**12
    if bucket < settings.test_fraction:
        return "test"
    if bucket < settings.test_fraction + settings.validation_fraction:
        return "validation"
    return "train"


def row_split(row: dict[str, Any], settings: SplitSettings) -> str:
    """The split of a hydrated row: every turn of a conversation shares its `source_id`, hence its split."""
    return assign_split(row.get("source_id", row["id"]), settings)
