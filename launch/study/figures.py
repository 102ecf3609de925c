"""The figures of a study's report (report.py), drawn from its groups of runs
(aggregate.py) into STUDY_DIR/plots/:

  sharpness_over_threshold.png  λ₁/threshold against learner updates. A panel per value
      of the grid axes other than the agent (a step-size sweep: a panel per step size,
      with a row per regime), in each a colour per agent: every seed thin, the median
      over seeds bold, the min–max over seeds shaded; the threshold (ratio 1) dashed and
      ±10 % of it shaded grey; × where a seed diverged.
  batch_sharpness_over_threshold.png  the same for batch sharpness, when probes record it.
  final_returns.png  per group the IQM of the final evaluation return over seeds with its
      95 % bootstrap CI, and each seed as a dot; the same panels' values on the x axis.

Laid out with constrained_layout and saved with bbox_inches="tight", so titles and
legends stay inside the image whatever the number of panels.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display on clusters
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.artist import Artist  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from eosrl.launch.study.aggregate import BAND, SHARPNESS_FIELDS, Group, returns_summary  # noqa: E402

AGENT_AXIS = "agent.kind"
PanelKey = Tuple[Tuple[str, str], ...]  # ((axis, label), ...): the grid values a panel shows
THIN: Dict[str, Any] = {"lw": 0.8, "alpha": 0.45}  # a seed
BOLD: Dict[str, Any] = {"lw": 2.2}  # the median over seeds
SHADE = 0.18  # the alpha of the min–max band
DPI = 110


# ----------------------------------------------------------------------------
# Panels and colours, shared by both figures.


def agent_of(group: Group) -> str:
    """A group's line (colour): its agent.kind value, else its config's agent kind; an
    explicit run (no grid values) is its own line."""
    if AGENT_AXIS in group.values:
        return group.values[AGENT_AXIS]
    config = group.runs[0].spec.config if group.runs else None
    return group.name if not group.values or config is None else config.agent.kind


def panel_of(group: Group, with_stage: bool) -> PanelKey:
    """A group's panel: its grid values other than the agent (and its stage when the
    figure has several)."""
    values = tuple((a, v) for a, v in group.values.items() if a != AGENT_AXIS)
    return ((("stage", group.stage),) if with_stage else ()) + values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text in ("true", "false")
    return True


def panel_text(key: PanelKey) -> str:
    """`lr=0.008 · offline`: a number is named by its key's last part, a label is itself."""
    return " · ".join(f"{axis.split('.')[-1]}={label}" if _is_number(label) else label for axis, label in key)


def agent_colors(groups: Sequence[Group]) -> Dict[str, str]:
    """One colour per agent in every panel and both figures (given all the study's groups):
    the values of agent.kind axes first, in the order they appear, then the other lines
    (explicit runs such as a recording)."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ordered = sorted(groups, key=lambda g: AGENT_AXIS not in g.values)  # stable: plan order within
    agents = list(dict.fromkeys(agent_of(g) for g in ordered))
    return {agent: cycle[i % len(cycle)] for i, agent in enumerate(agents)}


def layout(keys: Sequence[PanelKey]) -> Tuple[int, int, Dict[PanelKey, Tuple[int, int]]]:
    """(rows, columns, panel -> cell). When the panels vary along two or more axes that
    every panel has: a column per value of the axis with the most values (the step size
    of a sweep) and a row per combination of the others. Otherwise wrapped, at most 4
    across (5 or 6 panels: 3 across)."""
    axes: Dict[str, List[str]] = {}
    for key in keys:
        for axis, label in key:
            axes.setdefault(axis, [])
            if label not in axes[axis]:
                axes[axis].append(label)
    varying = [a for a, labels in axes.items() if len(labels) > 1]
    if len(varying) >= 2 and all(any(a == col for a, _ in key) for key in keys for col in varying):
        col = max(varying, key=lambda a: len(axes[a]))  # the first of the widest on ties
        rows = list(dict.fromkeys(tuple(i for i in key if i[0] != col) for key in keys))
        cells = {key: (rows.index(tuple(i for i in key if i[0] != col)), axes[col].index(dict(key)[col]))
                 for key in keys}
        return len(rows), len(axes[col]), cells
    n = len(keys)
    cols = n if n <= 4 else math.ceil(n / math.ceil(n / 4))
    return math.ceil(n / cols), cols, {key: divmod(i, cols) for i, key in enumerate(keys)}


def _spans_decades(values: Sequence[float], decades: float = 2.0) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and math.log10(max(finite) / min(finite)) >= decades


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------
# Sharpness over the threshold.


def _median_band(series: Sequence[Sequence[Tuple[float, float]]]) -> Tuple[List[float], List[float], List[float], List[float]]:
    """(updates, median, min, max) over the seeds probed at each update (finite values)."""
    by_step: Dict[float, List[float]] = {}
    for points in series:
        for step, value in points:
            if math.isfinite(value):
                by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return (steps, [float(np.median(by_step[s])) for s in steps], [min(by_step[s]) for s in steps],
            [max(by_step[s]) for s in steps])


def _draw_group(ax, group: Group, field: str, color: str) -> Tuple[List[float], bool]:
    """The group's seeds (thin), median (bold) and min–max band; (values drawn, any diverged)."""
    runs = [r for r in group.runs if r.ratios.get(field)]
    series = [r.ratios[field] for r in runs]
    steps, med, low, high = _median_band(series)
    diverged = False
    if len(runs) > 1:
        ax.fill_between(steps, low, high, color=color, alpha=SHADE, lw=0)
        for points in series:
            finite = [p for p in points if math.isfinite(p[1])]
            ax.plot([p[0] for p in finite], [p[1] for p in finite], color=color, **THIN)
    ax.plot(steps, med, color=color, marker="o" if len(steps) <= 30 else None, ms=3, **BOLD)
    for run, points in zip(runs, series):
        finite = [p for p in points if math.isfinite(p[1])]
        if run.diverged and finite:  # at the divergence, level with the seed's last finite probe
            x = run.divergence_step if run.divergence_step is not None else finite[-1][0]
            ax.plot([x], [finite[-1][1]], "x", color=color, ms=9, mew=2)
            diverged = True
    return [v for points in series for _, v in points], diverged


def ratios_span_decades(groups: Sequence[Group], field: str = "sharpness") -> bool:
    """Whether the groups' ratios and the threshold span two decades (the figure's axis is then logarithmic)."""
    return _spans_decades([v for g in groups for r in g.runs for _, v in r.ratios.get(field) or []] + [1.0])


def plot_sharpness_across_seeds(groups: Sequence[Group], path: Path, field: str = "sharpness",
                                linear: bool = False) -> Optional[Path]:
    """λ₁/threshold (or another SHARPNESS_FIELDS field) against updates; None without probes.
    The axis is logarithmic where the ratios span two decades, unless `linear`: then it
    runs from 0 to the highest ratio drawn (at least 1.25, at most 2), a view of how close
    to the threshold the groups come."""
    colors = agent_colors(groups)
    groups = [g for g in groups if any(r.ratios.get(field) for r in g.runs)]
    if not groups:
        return None
    name = SHARPNESS_FIELDS[field]
    with_stage = len({g.stage for g in groups}) > 1
    panels: Dict[PanelKey, List[Group]] = {}
    for g in groups:
        panels.setdefault(panel_of(g, with_stage), []).append(g)
    rows, cols, cells = layout(list(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.3 * rows + 0.9), sharey=True,
                             squeeze=False, layout="constrained")
    drawn: List[float] = []
    any_diverged = False
    for key, members in panels.items():
        ax = axes[cells[key]]
        ax.axhspan(1.0 - BAND, 1.0 + BAND, color="0.5", alpha=0.15, lw=0)
        ax.axhline(1.0, color="k", ls="--", lw=1)
        for g in members:
            values, diverged = _draw_group(ax, g, field, colors[agent_of(g)])
            drawn += values
            any_diverged |= diverged
        thresholds = {g.threshold for g in members}
        title = panel_text(key)
        if len(thresholds) == 1 and None not in thresholds:
            title += f"{' ' if title else ''}(threshold {thresholds.pop():g})"
        ax.set_title(textwrap.fill(title, 42), fontsize="medium")
        ax.grid(alpha=0.3)
    used = set(cells[k] for k in panels)
    for cell in ((r, c) for r in range(rows) for c in range(cols)):
        if cell not in used:
            axes[cell].set_visible(False)
        elif (cell[0] + 1, cell[1]) not in used:  # the lowest panel of its column
            axes[cell].set_xlabel("learner updates")
    # The threshold must stay in view: ratios far below it (a short run) get a log axis.
    if linear:
        finite = [v for v in drawn if math.isfinite(v)]
        axes[0][0].set_ylim(0.0, min(max(1.25, 1.05 * max(finite, default=0.0)), 2.0))
    elif _spans_decades(drawn + [1.0]):
        axes[0][0].set_yscale("log")
    fig.supylabel(f"{name} / threshold")
    fig.suptitle(f"{name} over the stability threshold, per group of seeds{', linear axis' if linear else ''}")
    seeded = any(len([r for r in g.runs if r.ratios.get(field)]) > 1 for g in groups)
    handles: List[Artist] = [Line2D([], [], color=c, label=a, **BOLD) for a, c in colors.items()
                             if any(agent_of(g) == a for g in groups)]
    if seeded:
        handles += [Line2D([], [], color="0.3", label="one seed", **THIN),
                    Line2D([], [], color="0.3", label="median over seeds", **BOLD),
                    Patch(color="0.3", alpha=SHADE, label="min–max over seeds")]
    handles += [Line2D([], [], color="k", ls="--", lw=1, label="threshold (ratio 1)"),
                Patch(color="0.5", alpha=0.15, label=f"within ±{BAND * 100:g} % of the threshold")]
    if any_diverged:
        handles.append(Line2D([], [], color="0.3", marker="x", ls="", ms=9, mew=2, label="diverged"))
    # As many legend columns as the panels' width holds, so a one-panel figure stays narrow.
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 2 * cols + 1),
               fontsize="small", frameon=False)
    return _save(fig, path)


# ----------------------------------------------------------------------------
# Final returns.


def plot_returns_across_seeds(groups: Sequence[Group], path: Path) -> Optional[Path]:
    """Per group the IQM of the final evaluation return with its CI and each seed's value;
    a column of groups per panel key, agents side by side. None when no run has a return."""
    summaries = [(g, returns_summary(g)) for g in groups]
    summaries = [(g, s) for g, s in summaries if s["iqm"] is not None]
    if not summaries:
        return None
    with_stage = len({g.stage for g, _ in summaries}) > 1
    # A category's label: its panel's grid values, or its stage (explicit runs have none).
    labels: Dict[PanelKey, str] = {}
    for g, _ in summaries:
        labels.setdefault(panel_of(g, with_stage), panel_text(panel_of(g, with_stage)) or g.stage)
    categories = list(labels)
    colors = agent_colors(groups)
    # Agents side by side within a category: the slots of the agents that category has.
    slots: Dict[PanelKey, List[str]] = {}
    for g, _ in summaries:
        slots.setdefault(panel_of(g, with_stage), [])
        if agent_of(g) not in slots[panel_of(g, with_stage)]:
            slots[panel_of(g, with_stage)].append(agent_of(g))
    width = 0.8 / max(len(agents) for agents in slots.values())
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(summaries) + 2.5), 4.2), layout="constrained")
    any_diverged = False
    for g, s in summaries:
        agents = slots[panel_of(g, with_stage)]
        x = categories.index(panel_of(g, with_stage)) + (agents.index(agent_of(g)) - (len(agents) - 1) / 2) * width
        point, low, high = s["iqm"]
        color = colors[agent_of(g)]
        ax.errorbar([x], [point], yerr=[[point - low], [high - point]], fmt="o", color=color, ms=6,
                    capsize=4, lw=1.5, zorder=3)
        seeds = [(value, diverged) for _, value, diverged in s["per_seed"] if value is not None]
        for i, (value, diverged) in enumerate(seeds):  # spread a little so equal values stay visible
            dx = (i - (len(seeds) - 1) / 2) * min(0.06, width / (len(seeds) + 1))
            ax.plot([x + dx], [value], "x" if diverged else "o", color=color, ms=4, alpha=0.6,
                    mfc="none" if not diverged else color, zorder=2)
            any_diverged |= diverged
    ax.set_xticks(range(len(categories)))
    long = max(len(label) for label in labels.values()) > 12 and len(categories) > 3
    ax.set_xticklabels([textwrap.fill(labels[k], 24) for k in categories], rotation=30 if long else 0,
                       ha="right" if long else "center", fontsize="small")
    ax.set_xlim(-0.6, len(categories) - 0.4)
    ax.set_ylabel("final evaluation return")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Final evaluation return: IQM over seeds, 95 % bootstrap CI")
    shown = {agent_of(g) for g, _ in summaries}
    handles: List[Artist] = [Line2D([], [], color=c, marker="o", ls="", ms=6, label=a)
                             for a, c in colors.items() if a in shown]
    handles.append(Line2D([], [], color="0.3", marker="o", mfc="none", ls="", ms=4, label="one seed"))
    if any_diverged:
        handles.append(Line2D([], [], color="0.3", marker="x", ls="", ms=4,
                              label="diverged seed (last periodic evaluation)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize="small",
               frameon=False)
    return _save(fig, path)
