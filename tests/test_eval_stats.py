"""eval.stats against numbers worked out by hand (no models: fast)."""

from __future__ import annotations

import math

import pytest

from ragtune.eval.stats import (
    MIN_QUESTIONS, harmonic_mean, mean_with_ci, paired_difference, paired_ragas_score, ragas_score, spread,
    wilson_interval,
)


def test_ragas_score_reproduces_the_seed_articles_number():
    # seed: faithfulness 0.9725, answer relevancy 0.7325 -> ragas_score 0.8356
    assert round(ragas_score(0.9725, 0.7325), 4) == 0.8356
    assert harmonic_mean(0.0, 0.9) == 0.0


def test_paired_bootstrap_matches_the_exact_bootstrap_distribution():
    """Per-question differences 0.2, 0.3, 0.4, 0.5 (base scores vary a lot, differences do not).

    A resample of 4 differences has mean 0.2 + 0.1*S/4 where S, the sum of four uniform draws from
    {0,1,2,3}, has counts 1, 4, 10, 20, ... out of 256: P(S<=1) = 5/256 = 2.0% < 2.5% < P(S<=2) = 15/256,
    so the 2.5th percentile is S=2 -> 0.25 and, by symmetry, the 97.5th is 0.45.
    """
    base = [0.1, 0.5, 0.3, 0.6]
    tuned = [b + d for b, d in zip(base, [0.2, 0.3, 0.4, 0.5])]
    result = paired_difference(base, tuned, n_resamples=20000, seed=0, min_n=2)
    assert result["n"] == 4
    assert result["delta"] == pytest.approx(0.35)
    assert result["ci_low"] == pytest.approx(0.25)
    assert result["ci_high"] == pytest.approx(0.45)
    assert (result["wins"], result["ties"], result["losses"]) == (4, 0, 0)
    assert result["verdict"] == "better"
    # an unpaired view of the same scores could not exclude 0: the base scores alone spread 0.1..0.6
    unpaired = mean_with_ci(base, n_resamples=20000, confidence_level=0.95, seed=0)
    assert unpaired["ci_high"] - unpaired["ci_low"] > result["ci_high"] - result["ci_low"]


def test_interval_that_includes_zero_declares_nothing():
    """Differences 0, 0, 0.3: P(no 0.3 drawn) = 8/27 > 2.5% so the low end is 0; P(all three) = 1/27 = 3.7% > 2.5%
    so the high end is 0.3. No loss at all, and still no declared difference."""
    result = paired_difference([0.5, 0.5, 0.2], [0.5, 0.5, 0.5], n_resamples=4000, seed=1, min_n=2)
    assert (result["ci_low"], result["ci_high"]) == (pytest.approx(0.0), pytest.approx(0.3))
    assert (result["wins"], result["ties"], result["losses"]) == (1, 2, 0)
    assert result["verdict"] == "no difference (CI includes 0)"


def test_worse_and_tie_tolerance():
    base = [0.9, 0.8, 0.85, 0.95, 0.9, 0.7]
    tuned = [b - 0.1 for b in base]
    result = paired_difference(base, tuned, n_resamples=1000, seed=0)
    assert result["ci_low"] == pytest.approx(-0.1) and result["ci_high"] == pytest.approx(-0.1)
    assert result["verdict"] == "worse" and result["losses"] == 6
    tolerant = paired_difference(base, tuned, n_resamples=1000, seed=0, tie_tolerance=0.1)
    assert tolerant["ties"] == 6


def test_a_mean_moved_by_too_few_questions_gets_no_verdict():
    """The demo's closed-book grounding: near zero for both models, nonzero for the base on 4 of 30 questions. The
    percentile interval excludes 0, but only 4 questions moved the mean; a fifth makes it a result."""
    base = [0.075, 0.019, 0.026, 0.047] + [0.0] * 26
    tuned = [0.0] * 30
    result = paired_difference(base, tuned, n_resamples=4000, seed=0)
    assert result["ci_high"] < 0 and result["losses"] == 4
    assert result["verdict"] == "too few questions differ (4 of 30 < 5)"
    fifth = paired_difference([*base[:4], 0.05, *base[5:]], tuned, n_resamples=4000, seed=0)
    assert fifth["verdict"] == "worse"
    # a tolerance that calls every small change a tie does not hide a consistent one
    consistent = paired_difference([0.5] * 30, [0.52] * 30, n_resamples=1000, seed=0, tie_tolerance=0.05)
    assert consistent["ties"] == 30 and consistent["verdict"] == "better"


def test_too_few_questions_never_get_a_verdict():
    base, tuned = [0.1, 0.2, 0.3, 0.4], [0.9, 0.9, 0.9, 0.9]
    assert len(base) < MIN_QUESTIONS
    result = paired_difference(base, tuned, n_resamples=1000, seed=0)
    assert result["ci_low"] > 0
    assert result["verdict"].startswith("too few questions")
    single = paired_difference([0.2], [0.4], n_resamples=1000, seed=0)
    assert single["ci_low"] is None and single["delta"] == pytest.approx(0.2)


def test_bootstrap_is_seeded():
    base = [0.1, 0.4, 0.35, 0.8, 0.5, 0.9, 0.2]
    tuned = [0.3, 0.2, 0.5, 0.7, 0.9, 0.8, 0.4]
    a = paired_difference(base, tuned, n_resamples=500, seed=7)
    b = paired_difference(base, tuned, n_resamples=500, seed=7)
    c = paired_difference(base, tuned, n_resamples=500, seed=8)
    assert a == b
    assert (a["ci_low"], a["ci_high"]) != (c["ci_low"], c["ci_high"])


def test_paired_ragas_score_recomputes_the_harmonic_mean_of_means():
    base_f, base_r = [1.0, 0.9, 1.0, 0.95, 1.0], [0.7, 0.75, 0.7, 0.8, 0.7]
    tuned_f, tuned_r = [1.0] * 5, [0.9] * 5
    result = paired_ragas_score(base_f, base_r, tuned_f, tuned_r, n_resamples=2000, seed=0)
    expected_base = harmonic_mean(sum(base_f) / 5, sum(base_r) / 5)
    assert result["base"] == pytest.approx(expected_base)
    assert result["tuned"] == pytest.approx(harmonic_mean(1.0, 0.9))
    assert result["delta"] == pytest.approx(result["tuned"] - expected_base)
    assert 0 < result["ci_low"] <= result["delta"] <= result["ci_high"]
    assert result["verdict"] == "better" and result["wins"] == 5


def test_wilson_interval_textbook_value():
    # 8 successes of 10 at 95%: the textbook Wilson interval is (0.490, 0.943)
    low, high = wilson_interval(8, 10, 0.95)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    assert wilson_interval(0, 0) == (None, None)


def test_spread_across_runs():
    s = spread([0.059, -0.099, 0.02])
    assert s["runs"] == 3 and s["min"] == -0.099 and s["max"] == 0.059
    assert s["std"] == pytest.approx(0.0823, abs=1e-4)
    assert not math.isnan(s["mean"])
