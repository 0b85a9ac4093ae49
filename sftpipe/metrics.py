"""Exact-match scoring of generated answers: plain Python, so the report reads it without torch.

A metric is a function of one (prediction, reference) pair and an entry in `EXACT_MATCH_METRICS`:
evaluation scores every held-out row with each entry, and the report and summary show each.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def strict_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def normalized_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


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


def first_number(text: str) -> float | None:
    """The first number written in `text` (thousands separators allowed), or None."""
    match = _NUMBER.search(text)
    return float(match[0].replace(",", "")) if match else None


def numeric_match(prediction: str, reference: str) -> bool:
    """The first number of the prediction equals the reference's (12.0 is 12); no number is no match."""
    expected, given = first_number(reference), first_number(prediction)
    return expected is not None and given == expected


@dataclass(frozen=True)
class Metric:
    score: Callable[[str, str], float]  # (prediction, reference) -> the row's score, a bool or in [0, 1]
    # Each row right or wrong: McNemar's exact test then compares two models on the same rows.
    right_or_wrong: bool


# name -> metric, in the order the report shows them. Each row of predictions.jsonl holds every name.
EXACT_MATCH_METRICS: dict[str, Metric] = {
    "exact_match": Metric(strict_match, right_or_wrong=True),
    "normalized_exact_match": Metric(normalized_match, right_or_wrong=True),
    "token_f1": Metric(token_f1, right_or_wrong=False),
}
