"""Exact-match scoring of generated answers: plain Python, so the report reads it without torch."""

from __future__ import annotations

import re
import string
from collections import Counter

EXACT_MATCH_METRICS = ("exact_match", "normalized_exact_match", "token_f1")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over the normalized tokens of prediction and reference."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> bool:
    """The answer as written, surrounding whitespace aside."""
    return prediction.strip() == reference.strip()


def normalized_exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def first_number(text: str) -> float | None:
    """The first number written in `text` (thousands separators allowed), or None."""
    match = _NUMBER.search(text)
    return float(match[0].replace(",", "")) if match else None


def numeric_match(prediction: str, reference: str) -> bool:
    """The first number of the prediction equals the reference's (12.0 is 12); no number is no match."""
    expected, given = first_number(reference), first_number(prediction)
    return expected is not None and given == expected
