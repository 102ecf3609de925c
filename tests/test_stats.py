"""Tests of launch/study/stats.py, the across-seed statistics of a study report
(Agarwal et al., 2021): the interquartile mean, the stratified bootstrap's
percentile interval and fraction_above; and the per-run numbers the report
aggregates (fraction_within, first_at_or_above, median_with_never). Expected values
are worked out by hand in the comments, not recomputed with the code under test."""
from __future__ import annotations

import numpy as np
import pytest

import math

from eosrl.launch.study.stats import (first_at_or_above, fraction_above, fraction_within, iqm,
                                      median_with_never, stratified_bootstrap_ci)


def test_iqm_of_one_to_eight_is_mean_of_middle_half():
    # n = 8, cut 2 from each end: 3, 4, 5, 6 -> 18 / 4.
    assert iqm(np.arange(1, 9)) == pytest.approx(4.5)


def test_iqm_ignores_outliers():
    # Sorted: -1000, 1, 2, 3, 4, 5, 6, 7000; cut 2 each end: 2, 3, 4, 5 -> 3.5,
    # while the plain mean is 6017 / 8 = 752.125.
    scores = np.array([7000.0, 1, 2, 3, -1000, 4, 5, 6])
    assert iqm(scores) == pytest.approx(3.5)


def test_iqm_when_n_not_divisible_by_four_cuts_floor_of_quarter():
    # n = 10, int(2.5) = 2 cut from each end (as scipy.stats.trim_mean):
    # sorted 0, 0, 1, 2, 3, 7, 50, 60, 70, 80 -> 1, 2, 3, 7, 50, 60 -> 123 / 6.
    scores = np.array([60.0, 0, 80, 1, 2, 70, 3, 7, 50, 0])
    assert iqm(scores) == pytest.approx(20.5)


def test_iqm_of_2d_array_pools_all_entries():
    # Flattened and sorted: -50, 1, 2, 3, 4, 5, 6, 100 -> middle 2, 3, 4, 5 -> 3.5.
    # (Per column it would be iqm(1, 2, 4, 5) = 3 and iqm(-50, 3, 6, 100) = 4.5.)
    scores = np.array([[1.0, 100.0], [2.0, 3.0], [4.0, -50.0], [5.0, 6.0]])
    assert iqm(scores) == pytest.approx(3.5)


def test_iqm_of_fewer_than_four_entries_is_the_mean():
    # n = 3: int(0.75) = 0 cut, so the plain mean (1 + 2 + 9) / 3 = 4.
    assert iqm(np.array([9.0, 1.0, 2.0])) == pytest.approx(4.0)
    assert iqm(np.array([7.0])) == pytest.approx(7.0)


def test_iqm_rejects_empty():
    with pytest.raises(ValueError):
        iqm(np.array([]))


def test_bootstrap_of_constant_scores_collapses_to_point():
    scores = np.full((5, 3), 2.5)
    assert stratified_bootstrap_ci(scores, np.mean, reps=200) == (2.5, 2.5, 2.5)
    assert stratified_bootstrap_ci(scores, iqm, reps=200) == (2.5, 2.5, 2.5)


@pytest.mark.parametrize("scores", [np.array([0.0, 1.0]), np.array([[0.0], [1.0]])])
def test_bootstrap_two_runs_one_task(scores):
    # Resample means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: 0 and 1 each
    # hold far more than 2.5 % of the mass, so the 95 % interval is (0, 1).
    point, low, high = stratified_bootstrap_ci(scores, np.mean, reps=2000)
    assert (point, low, high) == (0.5, 0.0, 1.0)


def test_bootstrap_is_stratified_by_task():
    # Two tasks, constant within each task: every stratified resample is again
    # [[0, 10], [0, 10]], so every mean is exactly 5. A bootstrap pooling all four
    # entries would also draw all-0 or all-10 resamples.
    scores = np.array([[0.0, 10.0], [0.0, 10.0]])
    assert stratified_bootstrap_ci(scores, np.mean, reps=2000) == (5.0, 5.0, 5.0)


def test_bootstrap_spread_comes_from_runs_within_tasks():
    # [[0, 0], [10, 10]]: each column's mean over two draws from {0, 10} is 0, 5 or
    # 10; the overall mean is 10 · Binomial(4, 1/2) / 4, so P(0) = P(10) = 1/16
    # (6.25 % > 2.5 %) and the 95 % interval is (0, 10) around the point 5.
    scores = np.array([[0.0, 0.0], [10.0, 10.0]])
    assert stratified_bootstrap_ci(scores, np.mean, reps=2000) == (5.0, 0.0, 10.0)


def test_bootstrap_column_draws_only_from_its_own_task():
    # The statistic sees [runs, tasks]. The min of column 1 over three draws from
    # {100, 101, 102} is 100 with probability 19/27 and 102 with probability 1/27
    # (3.7 % > 2.5 %); values from column 0 (0, 1, 2) can never appear.
    scores = np.array([[0.0, 100.0], [1.0, 101.0], [2.0, 102.0]])
    point, low, high = stratified_bootstrap_ci(scores, lambda x: float(x[:, 1].min()), reps=2000)
    assert (point, low, high) == (100.0, 100.0, 102.0)


def test_bootstrap_ci_of_mean_covers_zero_about_95_percent():
    covered = 0
    for seed in range(200):
        sample = np.random.default_rng(10_000 + seed).standard_normal(10)
        _, low, high = stratified_bootstrap_ci(sample, np.mean, reps=500, seed=seed)
        covered += low <= 0.0 <= high
    # The percentile interval undercovers a little at 10 runs; 88-99 % allows for it
    # and for the binomial noise of 200 trials (sd about 1.5 %).
    assert 0.88 <= covered / 200 <= 0.99


def test_bootstrap_same_seed_same_interval():
    scores = np.random.default_rng(7).standard_normal((6, 4))
    first = stratified_bootstrap_ci(scores, iqm, reps=300, seed=11)
    assert stratified_bootstrap_ci(scores, iqm, reps=300, seed=11) == first
    assert stratified_bootstrap_ci(scores, iqm, reps=300, seed=12) != first


@pytest.mark.parametrize("kwargs", [{"reps": 0}, {"confidence": 1.0}, {"confidence": 0.0}])
def test_bootstrap_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        stratified_bootstrap_ci(np.ones((3, 2)), np.mean, **kwargs)


@pytest.mark.parametrize("shape", [(0, 2), (2, 0), (2, 2, 2)])
def test_bootstrap_rejects_bad_shapes(shape):
    with pytest.raises(ValueError):
        stratified_bootstrap_ci(np.ones(shape), np.mean, reps=10)


def test_fraction_above_is_strict():
    # 0.5, 1.0, 2.0, 3.0, 2.0 with threshold 2.0: only 3.0 is above -> 1/5.
    assert fraction_above(np.array([0.5, 1.0, 2.0, 3.0, 2.0]), 2.0) == pytest.approx(0.2)


def test_fraction_above_pools_2d_and_counts_nan_as_not_above():
    # Entries above 1.0: 4.0 and 1.5 -> 2 of 6.
    values = np.array([[4.0, 0.0, np.nan], [1.5, 1.0, -3.0]])
    assert fraction_above(values, 1.0) == pytest.approx(2 / 6)
    assert fraction_above(values, -10.0) == pytest.approx(5 / 6)


def test_fraction_above_rejects_empty():
    with pytest.raises(ValueError):
        fraction_above(np.array([]), 0.0)


def test_fraction_within_is_closed_and_counts_nan_as_outside():
    # [0.9, 1.1]: 0.9 and 1.1 are inside, 0.89 and 1.2 and NaN are not -> 3 of 6 (with 1.0).
    values = np.array([0.9, 1.1, 0.89, 1.2, np.nan, 1.0])
    assert fraction_within(values, 0.9, 1.1) == pytest.approx(0.5)
    assert fraction_within(values, 0.9, math.inf) == pytest.approx(4 / 6)  # "at least 0.9"
    with pytest.raises(ValueError):
        fraction_within(np.array([]), 0.0, 1.0)


def test_first_at_or_above():
    steps, values = [100, 200, 300, 400], [0.5, math.nan, 0.9, 2.0]
    assert first_at_or_above(steps, values, 0.9) == 300  # NaN is never at or above
    assert first_at_or_above(steps, values, 3.0) is None
    assert first_at_or_above([], [], 0.0) is None


def test_median_with_never():
    # 300, 500, never -> 500; 300, never, never -> never; two seeds, one never -> never.
    assert median_with_never([500, 300, None]) == 500
    assert median_with_never([300, None, None]) == math.inf
    assert median_with_never([300, None]) == math.inf
    assert median_with_never([300, 500]) == 400
    with pytest.raises(ValueError):
        median_with_never([])
