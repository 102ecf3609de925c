"""Runs that differ only by seed, read and summarised together: per run its final
evaluation return, its probes as λ₁/threshold (and batch sharpness/threshold when the
records have it) and whether its learner diverged; per group the across-seed numbers of
report.md's "Across seeds" tables (IQM and stratified bootstrap CI from stats.py) and
the series of its figures (figures.py). The definitions are printed in the report
(DEFINITIONS) and described in docs/study.md.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from eosrl.launch.rundir import number
from eosrl.launch.study.spec import FINISHED, SEED_AXIS, RunSpec, read_records
from eosrl.launch.study.stats import (first_at_or_above, fraction_within, iqm, median_with_never,
                                      stratified_bootstrap_ci)

EDGE = 0.9  # "reached the edge": λ₁ >= EDGE · threshold
BAND = 0.1  # "at the edge": λ₁ within ±BAND of the threshold
END_PROBES = 5  # "at the end": the mean over a run's last END_PROBES probes
REPS = 2000  # bootstrap resamples per interval
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0  # fixed, so a report rebuilt from the same runs shows the same intervals
# Probe fields compared with the threshold: λ₁ of the probe batch's Hessian, and (when the
# prober writes them) the batch sharpness along the gradient and along the step the optimiser
# takes (agents/step_readings.py). Absent fields are skipped, so older runs still report.
SHARPNESS_FIELDS = {"sharpness": "λ₁", "batch_sharpness": "batch sharpness",
                    "momentum_batch_sharpness": "momentum batch sharpness"}

Series = List[Tuple[float, float]]  # (learner update, value / threshold), sorted by update


@dataclasses.dataclass
class SeedRun:
    """What the report needs of one run of a group."""
    spec: RunSpec
    status: Optional[str]  # the `finished` event's status; None while the run has not finished
    diverged: bool  # the learner (or the run) finished `diverged`
    divergence_step: Optional[int]
    final_return: Optional[float]  # see DEFINITIONS
    ratios: Dict[str, Series]  # SHARPNESS_FIELDS key -> its probes over the threshold
    raw: Series  # (update, raw_sharpness): λ₁ of the Hessian itself, probed under a preconditioner
    thresholds: List[float]  # the finite thresholds of its probes

    @property
    def seed_label(self) -> str:
        return "run" if self.spec.seed is None else f"s{self.spec.seed}"


@dataclasses.dataclass
class Group:
    """Runs of one stage that differ only by seed (the same RunSpec.group)."""
    stage: str
    name: str
    values: Dict[str, str]  # grid values, without the seed
    runs: List[SeedRun]

    @property
    def threshold(self) -> Optional[float]:
        """The threshold of every probe of the group, if it is one value (constant lr)."""
        values = {t for run in self.runs for t in run.thresholds}
        return values.pop() if len(values) == 1 else None


def ratio_series(records: Sequence[Dict[str, Any]], field: str) -> Series:
    """(update, record[field] / record["threshold"]) of each probe with `field`; NaN where the
    value is not finite (a diverging run) or the threshold is (an optimiser without one).
    λ₁ of records written before probes had a `threshold` is their `sharpness_over_threshold`."""
    points = []
    for r in records:
        step = number(r.get("step"))
        if r.get("kind") != "probe" or field not in r or step is None:
            continue
        value, threshold = number(r.get(field)), number(r.get("threshold"))
        older = number(r.get("sharpness_over_threshold")) if field == "sharpness" and "threshold" not in r else None
        if value is not None and threshold is not None and math.isfinite(threshold) and threshold > 0:
            ratio = value / threshold
        else:
            ratio = older if older is not None else math.nan
        points.append((step, ratio))
    return sorted(points, key=lambda p: p[0])


def value_series(records: Sequence[Dict[str, Any]], field: str) -> Series:
    """(update, record[field]) of each probe with a finite `field`."""
    points = [(number(r.get("step")), number(r.get(field))) for r in records if r.get("kind") == "probe"]
    return sorted(((s, v) for s, v in points if s is not None and v is not None and math.isfinite(v)),
                  key=lambda p: p[0])


def final_return(records: Sequence[Dict[str, Any]], finished: Dict[str, Any]) -> Optional[float]:
    """A completed run's final evaluation; a diverged run's last periodic one; None otherwise."""
    if finished.get("status") == "completed":
        return number(finished.get("final_eval_return"))
    if finished.get("status") == "diverged":
        evals = [number(r.get("return_mean")) for r in records if r.get("kind") == "eval"]
        evals = [v for v in evals if v is not None]
        return evals[-1] if evals else None
    return None


def read_run(spec: RunSpec) -> SeedRun:
    records = read_records(spec.run_dir)
    events = [r for r in records if r.get("kind") == "event"]
    finished = events[-1] if events and events[-1].get("event") == "finished" else {}
    diverged = finished.get("status") == "diverged" or any(
        e.get("event") == "learner_finished" and e.get("status") == "diverged" for e in events)
    divergence = next((e for e in events if e.get("event") == "divergence"), None)
    thresholds = [number(r.get("threshold")) for r in records if r.get("kind") == "probe"]
    return SeedRun(spec=spec, status=finished.get("status"), diverged=diverged,
                   divergence_step=int(divergence["step"]) if divergence else None,
                   final_return=final_return(records, finished),
                   ratios={f: ratio_series(records, f) for f in SHARPNESS_FIELDS},
                   raw=value_series(records, "raw_sharpness"),
                   thresholds=[t for t in thresholds if t is not None and math.isfinite(t)])


def group_runs(specs: Sequence[RunSpec]) -> List[Group]:
    """The study's runs grouped by (stage, group), in the order of the plan."""
    groups: Dict[Tuple[str, str], Group] = {}
    for spec in specs:
        key = (spec.stage, spec.group or spec.name)
        if key not in groups:
            values = {k: v for k, v in spec.values.items() if k != SEED_AXIS}
            groups[key] = Group(spec.stage, key[1], values, [])
        groups[key].runs.append(read_run(spec))
    return list(groups.values())


# ----------------------------------------------------------------------------
# Across seeds.


def across_seeds(values: Sequence[float]) -> Tuple[float, float, float]:
    """(IQM, low, high) of per-seed values: the 95 % percentile interval of the IQM over
    stratified bootstrap resamples of the seeds (one task, so stratifying changes nothing)."""
    return stratified_bootstrap_ci(np.asarray(values, dtype=np.float64), iqm, reps=REPS,
                                   confidence=CONFIDENCE, seed=BOOTSTRAP_SEED)


def returns_summary(group: Group) -> Dict[str, Any]:
    """The group's final evaluation returns: per seed and, over the runs that have one, the IQM and CI."""
    values = [r.final_return for r in group.runs if r.final_return is not None]
    return {"n": len(values), "runs": len(group.runs),
            "per_seed": [(r.seed_label, r.final_return, r.diverged) for r in group.runs],
            "iqm": across_seeds(values) if values else None}


def ratio_summary(group: Group, field: str = "sharpness") -> Optional[Dict[str, Any]]:
    """Per run with probes of `field`: its peak value/threshold, the mean of its last
    END_PROBES finite ones, the fraction of its probes
    with value/threshold >= EDGE, the fraction within 1 ± BAND, the first update with
    value/threshold >= EDGE and, for runs that got there, the fraction within 1 ± BAND of
    the probes from that one on; the peaks and fractions aggregated over seeds (IQM, CI), the
    first updates' median over seeds (never = later than any update). None when no run of
    the group has such probes."""
    runs = [r for r in group.runs if r.ratios.get(field) and r.status in FINISHED]
    if not runs:
        return None
    peaks, end, reached, near, first, held = [], [], [], [], [], []
    for run in runs:
        steps = [p[0] for p in run.ratios[field]]
        ratios = np.array([p[1] for p in run.ratios[field]])
        finite = ratios[np.isfinite(ratios)]
        if finite.size:  # a run whose only probe is NaN has no peak
            peaks.append(float(finite.max()))
        last = ratios[-END_PROBES:]
        if np.isfinite(last).any():
            end.append(float(np.nanmean(last)))
        reached.append(fraction_within(ratios, EDGE, math.inf))
        near.append(fraction_within(ratios, 1.0 - BAND, 1.0 + BAND))
        first.append(first_at_or_above(steps, list(ratios), EDGE))
        if first[-1] is not None:  # the edge once reached: the probes from the first crossing on
            held.append(fraction_within(ratios[steps.index(first[-1]):], 1.0 - BAND, 1.0 + BAND))
    return {"n": len(runs), "runs": len(group.runs), "seeds": [r.seed_label for r in runs],
            "probes": [len(r.ratios[field]) for r in runs],
            "peak": across_seeds(peaks) if peaks else None, "peak_per_seed": peaks,
            "end": across_seeds(end) if end else None, "end_per_seed": end,
            "reached": across_seeds(reached), "reached_per_seed": reached,
            "near": across_seeds(near), "near_per_seed": near,
            "held": across_seeds(held) if held else None, "held_per_seed": held,
            "first": first, "first_median": median_with_never(first),
            "diverged": sum(r.diverged for r in group.runs)}


def raw_summary(group: Group) -> Optional[Dict[str, Any]]:
    """Per run with `raw_sharpness` probes (an adaptive optimiser, whose `sharpness` is of the
    preconditioned Hessian): the peak and the mean of the last END_PROBES values of λ₁ of the
    Hessian itself, each aggregated over seeds (IQM, CI). None when no run has them."""
    runs = [r for r in group.runs if r.raw and r.status in FINISHED]
    if not runs:
        return None
    peaks = [max(v for _, v in r.raw) for r in runs]
    end = [float(np.mean([v for _, v in r.raw[-END_PROBES:]])) for r in runs]
    return {"n": len(runs), "runs": len(group.runs), "probes": [len(r.raw) for r in runs],
            "peak": across_seeds(peaks), "peak_per_seed": peaks, "end": across_seeds(end), "end_per_seed": end}


DEFINITIONS = [
    "Runs of a stage that differ only by seed (`seeds:`, or a `run.seed` grid axis) form a group; "
    "*runs* is the number of its runs that have the quantity / the number of its runs. A run that has not "
    "finished (`completed` or `diverged`: one interrupted, or still running) is left out of the tables, "
    "whose *end* and fractions would otherwise describe a part of it; the figures draw it as far as it got.",
    f"**IQM [low, high]**: the interquartile mean over the group's seeds (Agarwal et al., 2021: the mean "
    "after cutting int(n/4) values from each end, so the plain mean for up to 3 seeds) with a "
    f"{CONFIDENCE * 100:g} % percentile interval over {REPS} stratified bootstrap resamples of the seeds "
    f"(numpy seed {BOOTSTRAP_SEED}). With 2 or 3 seeds the interval is the range of the seeds: a "
    "resample of only the lowest seed has probability 1/4 or 1/27, more than 2.5 %.",
    "**Final evaluation return**: for a completed run the `final_eval_return` of its `finished` event "
    "(the mean return of `run.eval_episodes` evaluation episodes, ε = `agent.epsilon_eval`, after the "
    "last update); for a diverged run "
    "(marked *div.*) its last periodic evaluation before the divergence, if any; a run that did not "
    "finish is left out.",
    "**λ₁/threshold** is a probe's `sharpness` (top eigenvalue of the TD loss's Hessian on the probe "
    "batch) over its `threshold` (the optimiser's stability threshold, 2(1+β)/η for heavy ball).",
    "**peak**: per run, the largest finite λ₁/threshold of its probes; **end**: the mean of the finite ones "
    f"among its last {END_PROBES} probes (where it settled, or was still going); each aggregated over seeds "
    "as IQM [CI].",
    f"**reached**: per run, the fraction of *all* its probes with λ₁/threshold ≥ {EDGE}; "
    f"**at the edge**: the fraction with {1 - BAND:.1f} ≤ λ₁/threshold ≤ {1 + BAND:.1f} (within "
    f"±{BAND * 100:g} % of the threshold). A non-finite λ₁ counts as neither. Aggregated over seeds as IQM [CI].",
    f"**held**: for each run that reached {EDGE}, the fraction of its probes from the first one with "
    f"λ₁/threshold ≥ {EDGE} on (that one included) that are within ±{BAND * 100:g} % of the threshold; "
    "aggregated as IQM [CI] over those runs only (how many: *k/n reached*).",
    f"**first update ≥ {EDGE}**: the learner update of a run's first probe with λ₁/threshold ≥ {EDGE}; "
    "the median over seeds counts *never* as later than any update (so it is *never* when half or more "
    "of the seeds never got there), followed by the per-seed values.",
    "**diverged**: runs whose learner finished `diverged` (a non-finite TD loss).",
    "**Hessian λ₁ (raw)**, for adaptive optimisers only: their `sharpness` is λ₁ of the preconditioned "
    "Hessian P⁻¹H (compared with their threshold); the probe's `raw_sharpness` is λ₁ of the TD loss's "
    "Hessian H itself, the quantity to compare between runs whose preconditioners differ. Peak and end "
    "as above, in the loss's own units.",
]
