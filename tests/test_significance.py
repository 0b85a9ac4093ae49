"""Significance of base vs tuned on constructed cases whose answers are known."""

import random

import pytest

from sftpipe.significance import mcnemar_exact, paired_bootstrap


def _pairs(base_only: int, tuned_only: int, both: int = 3, neither: int = 4) -> tuple[list[bool], list[bool]]:
    base = [True] * base_only + [False] * tuned_only + [True] * both + [False] * neither
    tuned = [False] * base_only + [True] * tuned_only + [True] * both + [False] * neither
    return base, tuned


@pytest.mark.parametrize(
    ("base_only", "tuned_only", "p_value"),
    [(0, 10, 2 / 1024), (1, 9, 22 / 1024), (9, 1, 22 / 1024), (5, 5, 1.0), (0, 0, 1.0)],
)
def test_mcnemar_exact_known_values(base_only, tuned_only, p_value):
    result = mcnemar_exact(*_pairs(base_only, tuned_only))
    assert result == {"base_only": base_only, "tuned_only": tuned_only, "p_value": pytest.approx(p_value)}


def test_mcnemar_exact_equals_scipys_binomial_test():
    from scipy.stats import binomtest

    rng = random.Random(0)
    for _ in range(20):
        base_only, tuned_only = rng.randint(0, 40), rng.randint(0, 40)
        if base_only + tuned_only == 0:
            continue
        expected = binomtest(min(base_only, tuned_only), base_only + tuned_only, 0.5).pvalue
        assert mcnemar_exact(*_pairs(base_only, tuned_only))["p_value"] == pytest.approx(expected, rel=1e-9)


def test_bootstrap_of_identical_scores_finds_no_difference():
    scores = [0.0, 1.0, 1.0, 0.5, 0.25] * 20
    assert paired_bootstrap(scores, scores) == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0, "samples": 10_000}


def test_bootstrap_of_a_sure_improvement():
    result = paired_bootstrap([0.0] * 50, [1.0] * 50, samples=999)
    assert result["delta"] == result["ci_low"] == result["ci_high"] == 1.0
    assert result["p_value"] == pytest.approx(2 / 1000)  # the smallest it reports: no resampling crossed 0


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = random.Random(1)
    base = [float(rng.random() < 0.5) for _ in range(2000)]
    tuned = [1.0 - b if rng.random() < 0.2 else b for b in base]  # 20% of the items flip either way
    result = paired_bootstrap(base, tuned, seed=3)
    differences = [t - b for b, t in zip(base, tuned, strict=True)]
    mean = sum(differences) / len(differences)
    se = (sum((d - mean) ** 2 for d in differences) / (len(differences) - 1) / len(differences)) ** 0.5
    assert result["delta"] == pytest.approx(mean)
    assert result["ci_low"] == pytest.approx(mean - 1.96 * se, abs=0.15 * se * 1.96)
    assert result["ci_high"] == pytest.approx(mean + 1.96 * se, abs=0.15 * se * 1.96)
    assert paired_bootstrap(base, tuned, seed=3) == result  # seeded: the same figures every run


def test_unpaired_inputs_are_an_error():
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 0.0], [1.0])
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])


def test_the_report_pairs_base_and_tuned_item_by_item():
    from sftpipe.io import PipelineError
    from sftpipe.report import significance

    def rows(answers):
        return [
            {"id": f"r{i}", "exact_match": a, "normalized_exact_match": a, "token_f1": float(a)} for i, a in enumerate(answers)
        ]

    predictions = {"base": rows([False] * 10), "tuned": rows([True] * 8 + [False] * 2)}
    documents = {"doc_id": [0, 1, 2, 3], "acc": [0.0, 1.0, 0.0, 1.0]}
    harness = {v: {"tasks": {"arc_easy": {"per_document": documents}}} for v in ("base", "tuned")}
    by_metric = {(r["task"], r["metric"]): r for r in significance(predictions, harness)}
    assert by_metric["exact match", "exact_match"]["delta"] == pytest.approx(0.8)
    assert by_metric["exact match", "exact_match"]["mcnemar_p_value"] == pytest.approx(2 / 2**8)
    assert "mcnemar_p_value" not in by_metric["exact match", "token_f1"]
    assert by_metric["arc_easy", "acc"]["delta"] == 0.0 and by_metric["arc_easy", "acc"]["p_value"] == 1.0
    predictions["tuned"] = predictions["tuned"][::-1]  # the same rows in another order are not paired by position
    with pytest.raises(PipelineError, match="not of the same held-out rows"):
        significance(predictions, harness)
