"""The words the filters compare rows by: lower-cased word tokens of a row's own content, and their n-grams."""

from __future__ import annotations

import re
from typing import Any

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    """Word n-grams; a text shorter than n words counts as one gram, so short questions still match."""
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def row_content(row: dict[str, Any]) -> str:
    """The row's own words without its prompt template, so a shared template never makes rows alike."""
    return row.get("content") or f"{row['prompt']}\n{row['completion']}"
