"""Is the tuned model better than the base, or did the held-out sample happen to favour it? Paired
comparisons of the two on the same items: McNemar's exact test for a right/wrong score (exact match),
and a paired bootstrap of the mean difference for any per-item score (exact match, token F1, every
lm-eval metric), with its confidence interval. Plain Python and numpy, so the report needs no torch."""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

BOOTSTRAP_SAMPLES = 10_000
CONFIDENCE = 0.95


def mcnemar_exact(base: Sequence[bool], tuned: Sequence[bool]) -> dict[str, float | int]:
    """McNemar's exact (binomial) test on paired right/wrong outcomes: under the null hypothesis that
    both models are equally good, each item one gets right and the other wrong is a fair coin flip.
    Two-sided p-value; `base_only` and `tuned_only` count those discordant items."""
    if len(base) != len(tuned):
        raise ValueError(f"paired outcomes of different lengths: {len(base)} and {len(tuned)}")
    base_only = sum(1 for b, t in zip(base, tuned, strict=True) if b and not t)
    tuned_only = sum(1 for b, t in zip(base, tuned, strict=True) if t and not b)
    n = base_only + tuned_only
    tail = sum(comb(n, k) for k in range(min(base_only, tuned_only) + 1)) / 2**n
    return {"base_only": base_only, "tuned_only": tuned_only, "p_value": min(1.0, 2 * tail)}


def paired_bootstrap(
    base: Sequence[float], tuned: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> dict[str, float]:
    """The mean per-item difference (tuned - base), a percentile confidence interval for it from
    `samples` resamplings of the items (the same items for both models), and the two-sided p-value of
    "no difference": twice the share of resamplings whose difference falls on the other side of 0
    (counting the observed sample among them, so it is never 0)."""
    import numpy as np

    if len(base) != len(tuned) or not len(base):
        raise ValueError(f"paired scores of lengths {len(base)} and {len(tuned)}")
    differences = np.asarray(tuned, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), size=(samples, len(differences)))].mean(axis=1)
    delta = float(differences.mean())
    low, high = np.quantile(means, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    if delta == 0:
        p_value = 1.0
    else:
        other_side = int((means <= 0).sum() if delta > 0 else (means >= 0).sum())
        p_value = min(1.0, 2 * (other_side + 1) / (samples + 1))
    return {"delta": delta, "ci_low": float(low), "ci_high": float(high), "p_value": p_value, "samples": samples}
