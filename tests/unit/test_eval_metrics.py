import math

import numpy as np
import pytest
from scipy import stats

from starmerge.errors import StarmergeError
from starmerge.eval.metrics import (
    METRICS,
    accuracy,
    bootstrap_ci,
    exact_match,
    macro_f1,
    normalized_score,
    spearman,
)


def test_accuracy_counts_none_as_wrong():
    assert accuracy(["a", "b", None, "c"], ["a", "a", "b", "c"]) == 0.5


def test_accuracy_length_mismatch():
    with pytest.raises(ValueError, match="got 2 predictions for 3 gold labels"):
        accuracy([1, 2], [1, 2, 3])


def test_macro_f1_three_classes_by_hand():
    golds = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", "c", "c"]
    # a: tp=2, pred=2, gold=3 -> F1 = 4/5; b: tp=1, pred=2, gold=2 -> 1/2;
    # c: tp=1, pred=2, gold=1 -> 2/3. Mean = (0.8 + 0.5 + 0.6667) / 3.
    assert macro_f1(preds, golds) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_macro_f1_unmatched_prediction_costs_recall_only():
    # None is not a class: a gets recall 1/2, b is perfect.
    assert macro_f1([None, "a", "b"], ["a", "a", "b"]) == pytest.approx((2 / 3 + 1.0) / 2)
    # explicit labels: a class never seen scores 0
    assert macro_f1(["a"], ["a"], labels=["a", "z"]) == 0.5


def test_exact_match_normalization():
    assert exact_match(["The  Paris!", "london", None], ["paris", "London.", "x"]) == pytest.approx(
        2 / 3
    )
    assert exact_match(["The Paris"], ["paris"], normalize=False) == 0.0
    assert exact_match([" paris "], ["paris"], normalize=False) == 1.0


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    golds = rng.integers(0, 6, size=50).astype(float)
    preds = golds + rng.normal(0, 2, size=50).round()
    assert spearman(preds, golds) == pytest.approx(stats.spearmanr(preds, golds).statistic)


def test_spearman_constant_side_is_zero():
    assert spearman([3.0, 3.0, 3.0], [1.0, 2.0, 3.0]) == 0.0
    assert spearman([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == 0.0


def test_normalized_score_by_hand():
    merged = {"a": 0.45, "b": 0.8, "c": 0.99}
    individual = {"a": 0.9, "b": 0.8, "c": 0.9}
    # 100 * mean(0.5, 1.0, 1.1) = 86.666..., not clipped above 100 for c
    assert normalized_score(merged, individual) == pytest.approx(260 / 3)


def test_normalized_score_errors():
    with pytest.raises(StarmergeError, match="individual score of task 'a' is 0"):
        normalized_score({"a": 0.5}, {"a": 0.0})
    with pytest.raises(StarmergeError, match="task 'b' has no individual score"):
        normalized_score({"b": 0.5}, {"a": 0.9})


def test_registry_names_and_did_you_mean():
    assert METRICS.names() == ["accuracy", "macro_f1", "exact_match", "spearman"]
    with pytest.raises(KeyError, match="Did you mean: accuracy"):
        METRICS.get("acuracy")


def test_bootstrap_ci_coverage_bernoulli():
    # 200 repetitions of a Bernoulli(0.7) sample of 200 against a fixed individual of 0.7:
    # the true normalized score is 100; a 95% interval should cover it ~95% of the time.
    rng = np.random.default_rng(123)
    covered = 0
    for rep in range(200):
        x = (rng.random(200) < 0.7).astype(float)
        lo, hi = bootstrap_ci({"t": x}, {"t": 0.7}, n_boot=500, seed=rep)
        covered += lo <= 100.0 <= hi
    assert 0.90 <= covered / 200 <= 0.99


def test_bootstrap_ci_is_seeded_and_brackets_estimate():
    samples = {"a": [1, 0, 1, 1, 0, 1, 1, 1], "b": [0, 1, 1, 1]}
    individual = {"a": 0.8, "b": 0.9}
    first = bootstrap_ci(samples, individual, seed=3)
    assert first == bootstrap_ci(dict(reversed(samples.items())), individual, seed=3)
    estimate = normalized_score({"a": 0.75, "b": 0.75}, individual)
    assert first[0] < estimate < first[1]


def test_bootstrap_ci_recomputes_non_mean_metrics():
    golds = list(range(30))
    preds = [g + (1 if g % 3 else -1) for g in golds]
    lo, hi = bootstrap_ci({"s": ("spearman", preds, golds)}, {"s": 1.0}, n_boot=300)
    point = 100 * spearman(preds, golds)
    assert lo <= point <= hi and hi <= 100.0 + 1e-9
    # without individual scores: interval of the plain mean metric
    lo, hi = bootstrap_ci({"a": [1, 1, 0, 1]}, n_boot=200)
    assert 0.0 <= lo <= 0.75 <= hi <= 1.0


def test_bootstrap_ci_bad_input():
    with pytest.raises(ValueError, match="level must be in"):
        bootstrap_ci({"a": [1]}, level=1.5)
    with pytest.raises(StarmergeError, match="no nonzero individual score"):
        bootstrap_ci({"a": [1, 0]}, {"a": 0.0})
    assert not math.isnan(bootstrap_ci({"a": [1.0]}, {"a": 1.0})[0])
