"""Aggregate statistics for a study's report across seeds, as recommended by
Agarwal et al. (2021), "Deep Reinforcement Learning at the Edge of the Statistical
Precipice" (NeurIPS 2021): the interquartile mean (IQM) as the point estimate,
percentile confidence intervals from a stratified bootstrap over runs, and the
fraction of values above a threshold (e.g. probes whose sharpness λ₁ exceeds the
stability threshold 2/η).

Why numpy and not rliable (the authors' library): `pip install --dry-run rliable`
against our pinned stack (numpy==1.26.4, scipy 1.17.1, pandas, seaborn already
present) would change nothing already installed, but would add seven packages:
rliable-1.2.0, arch-7.2.0, statsmodels-0.15.0, patsy-1.0.3, formulaic-1.2.2,
interface_meta-2.0.1 and narwhals-2.29.0. The project pins a library only where it
does the job well and installs cleanly; here the job is an IQM and a stratified
bootstrap, a few dozen lines of numpy, so six transitive dependencies (and arch's
statsmodels stack) are not worth it. The definitions below follow rliable's
(`metrics.aggregate_iqm`, `library.StratifiedBootstrap`, percentile intervals).
scipy (installed only as a dependency of jax, not declared by us) is not used:
the trimming is written out exactly as `scipy.stats.trim_mean` does it.

Layout: scores are [runs, tasks] as in rliable — runs are seeds, tasks are the
games or settings the aggregate is taken over. A 1-D array is a single task.

Also the per-run numbers the report aggregates over seeds: the fraction of values in a
band (probes within ±10 % of the threshold), the first step at which a series reaches
a level, and a median of such times where some seeds never got there.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import numpy as np


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean of all entries: the mean of the middle 50 % after sorting.

    Agarwal et al. (2021), section 4 ("IQM"): discard the bottom and top 25 % of the
    pooled run × task scores and average the rest. As in rliable's `aggregate_iqm`
    (scipy.stats.trim_mean(x, 0.25, axis=None)), int(0.25·n) entries are cut from
    each end of the flattened array, so for n not divisible by 4 slightly more than
    half the entries are kept.
    """
    flat = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = flat.size
    if n == 0:
        raise ValueError("iqm of an empty array")
    cut = int(0.25 * n)  # trim_mean's rounding: down, from each end
    return float(np.mean(flat[cut:n - cut]))


def _as_runs_by_tasks(scores: np.ndarray) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim == 1:
        return array[:, None]
    if array.ndim != 2:
        raise ValueError(f"scores must be [runs] or [runs, tasks], got shape {array.shape}")
    return array


def stratified_bootstrap_ci(scores: np.ndarray, statistic: Callable[[np.ndarray], float], reps: int = 2000,
                            confidence: float = 0.95, seed: int = 0) -> Tuple[float, float, float]:
    """(point estimate, low, high): percentile CI of `statistic` over `reps` stratified bootstrap resamples.

    Agarwal et al. (2021), section 3 ("stratified bootstrap confidence intervals"):
    `scores` is [runs, tasks] (rliable's layout: runs = seeds, tasks = games/settings);
    each resample draws, for each task (column) independently, `runs` rows with
    replacement (stratified by task), as rliable's StratifiedBootstrap does. A 1-D
    array is one task. Stratifying keeps every task equally represented in every
    resample, so the interval reflects run-to-run noise only, not which tasks
    happened to be drawn.

    `statistic` receives each resample in the layout of `scores` (1-D if it is 1-D,
    [runs, tasks] otherwise). The point estimate is `statistic(scores)`; low and high
    are the (1 − confidence)/2 and (1 + confidence)/2 percentiles of the resampled
    statistics (numpy's linear interpolation). Deterministic for a given `seed`.
    """
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    original = np.asarray(scores, dtype=np.float64)
    table = _as_runs_by_tasks(original)
    runs, tasks = table.shape
    if runs == 0 or tasks == 0:
        raise ValueError(f"scores must not be empty, got shape {original.shape}")

    rng = np.random.default_rng(seed)
    columns = np.arange(tasks)[None, None, :]
    values = np.empty(reps, dtype=np.float64)
    # Indices are drawn a chunk of resamples at a time (about a million cells) to keep
    # the per-resample overhead low without holding reps × runs × tasks at once.
    chunk = max(1, min(reps, 1_000_000 // (runs * tasks)))
    for start in range(0, reps, chunk):
        count = min(chunk, reps - start)
        # One run index per (resample, row, task) cell: each column is resampled on
        # its own, so resample[i, j] always comes from task j (rliable's update_indices).
        rows = rng.integers(0, runs, size=(count, runs, tasks))
        resamples = table[rows, columns]
        for k in range(count):
            values[start + k] = statistic(resamples[k].reshape(original.shape))

    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(statistic(original)), float(low), float(high)


def fraction_above(values: np.ndarray, threshold: float) -> float:
    """Fraction of entries > threshold (e.g. probes with λ₁ above the stability threshold).

    Agarwal et al. (2021), section 4, performance profiles: the fraction of runs
    scoring above τ; here the strict inequality counts entries exactly at the
    threshold as not above it. NaN entries count as not above.
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size == 0:
        raise ValueError("fraction_above of an empty array")
    return float(np.count_nonzero(flat > threshold) / flat.size)


def fraction_within(values: np.ndarray, low: float, high: float) -> float:
    """Fraction of entries in the closed interval [low, high] (e.g. probes with λ₁ within
    ±10 % of the threshold: low 0.9, high 1.1). NaN entries count as outside."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size == 0:
        raise ValueError("fraction_within of an empty array")
    return float(np.count_nonzero((flat >= low) & (flat <= high)) / flat.size)


def first_at_or_above(steps: Sequence[float], values: Sequence[float], level: float) -> Optional[float]:
    """The first step (in the order given) whose value is >= level; None if none is (NaN never is)."""
    for step, value in zip(steps, values):
        if value >= level:  # False for NaN
            return step
    return None


def median_with_never(values: Sequence[Optional[float]]) -> float:
    """The median of per-seed event times where None means "never": it counts as later than
    any time, so the median is inf ("never") when half or more of the seeds never got there
    (with an even count, numpy's mean of the two middle values is inf if one is)."""
    if not values:
        raise ValueError("median_with_never of no values")
    return float(np.median([math.inf if v is None else float(v) for v in values]))
