"""A study's report: STUDY_DIR/report.md with the runs that differ only by seed
aggregated (final return; sharpness relative to the threshold; divergences), a row per
run (status, final return, sharpness, divergence, wall time), the runs that did not
finish, the figures (drawn by figures.py into STUDY_DIR/plots/) and what each run ran.
See docs/study.md.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from eosrl.launch.rundir import RunDir
from eosrl.launch.study.aggregate import (DEFINITIONS, EDGE, END_PROBES, SHARPNESS_FIELDS, Group, group_runs,
                                          ratio_summary, raw_summary, returns_summary)
from eosrl.launch.study.spec import FINISHED, RunResult, RunSpec, summarize_run


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def _values_text(values: Dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "–"


def _interval(ci: Optional[Tuple[float, float, float]], digits: int = 2) -> str:
    """IQM [low, high]."""
    if ci is None:
        return "–"
    point, low, high = ci
    return f"{_fmt(point, digits)} [{_fmt(low, digits)}, {_fmt(high, digits)}]"


def _update(value: Optional[float]) -> str:
    return "never" if value is None or math.isinf(value) else f"{value:.0f}"


def _capital(name: str) -> str:
    """`name` capitalised for a heading; λ₁ stays as it is."""
    return name[:1].upper() + name[1:] if name[:1].isascii() else name


def _group_cells(group: Group) -> str:
    return f"| {group.stage} | {group.name} | {_values_text(group.values)} "


def returns_table(groups: Sequence[Group]) -> List[str]:
    lines = ["| stage | group | grid values | runs | final eval return, IQM [95 % CI] | per seed |",
             "|---|---|---|---:|---:|---|"]
    for group in groups:
        r = returns_summary(group)
        seeds = ", ".join(f"{label} {_fmt(value)}" + (" (div.)" if diverged else "")
                          for label, value, diverged in r["per_seed"])
        lines.append(_group_cells(group) + f"| {r['n']}/{r['runs']} | {_interval(r['iqm'])} | {seeds} |")
    return lines


def ratio_table(groups: Sequence[Group], field: str) -> List[str]:
    """The across-seed table of `field`/threshold; [] when no group has such probes."""
    name = SHARPNESS_FIELDS[field]
    rows = []
    for group in groups:
        r = ratio_summary(group, field)
        if r is None:
            continue
        firsts = ", ".join(f"{s} {_update(v)}" for s, v in zip(r["seeds"], r["first"]))
        rows.append(_group_cells(group) + f"| {r['n']}/{r['runs']} | {', '.join(map(str, r['probes']))} "
                    f"| {_interval(r['peak'])} | {_interval(r['end'])} | {_interval(r['reached'])} "
                    f"| {_interval(r['near'])} "
                    f"| {_interval(r['held'])} ({len(r['held_per_seed'])}/{r['n']} reached) "
                    f"| {_update(r['first_median'])} ({firsts}) | {r['diverged']}/{r['runs']} |")
    if not rows:
        return []
    return [f"| stage | group | grid values | runs | probes per run | peak {name}/threshold, IQM [95 % CI] "
            f"| end: last {END_PROBES} probes' mean, IQM [95 % CI] "
            f"| reached: {name}/threshold ≥ {EDGE}, IQM [95 % CI] | at the edge: within ±10 %, IQM [95 % CI] "
            f"| held: within ±10 % once ≥ {EDGE}, IQM [95 % CI] "
            f"| first update ≥ {EDGE}: median (per seed) | diverged |",
            "|---|---|---|---:|---|---:|---:|---:|---:|---:|---|---:|"] + rows


def raw_table(groups: Sequence[Group]) -> List[str]:
    """The across-seed table of the Hessian's own λ₁ (`raw_sharpness`); [] when no group has it."""
    rows = []
    for group in groups:
        r = raw_summary(group)
        if r is not None:
            rows.append(_group_cells(group) + f"| {r['n']}/{r['runs']} | {', '.join(map(str, r['probes']))} "
                        f"| {_interval(r['peak'])} | {_interval(r['end'])} "
                        f"| {', '.join(_fmt(v) for v in r['end_per_seed'])} |")
    if not rows:
        return []
    return ["| stage | group | grid values | runs | probes per run | peak Hessian λ₁, IQM [95 % CI] "
            f"| end: last {END_PROBES} probes' mean, IQM [95 % CI] | end per seed |",
            "|---|---|---|---:|---|---:|---:|---|"] + rows


def across_seeds_section(groups: Sequence[Group]) -> List[str]:
    """The aggregated tables, when some group has more than one run (otherwise they would
    repeat the run table)."""
    lines = ["## Across seeds", ""]
    if all(len(g.runs) < 2 for g in groups):
        return lines + ["Every group has one run, so there is nothing to aggregate: give the study "
                        "`seeds:` (docs/study.md) for IQMs and confidence intervals over seeds.", ""]
    lines += [f"- {d}" for d in DEFINITIONS] + ["", "### Final evaluation return", ""]
    lines += returns_table(groups)
    for field, name in SHARPNESS_FIELDS.items():
        table = ratio_table(groups, field)
        if table:
            lines += ["", f"### {_capital(name)} relative to the stability threshold", ""] + table
            if field != "sharpness":
                lines += ["", f"{_capital(name)} (the probe's `{field}`, a mean over its batches) is "
                          "compared with the same `threshold` as λ₁, with the same definitions. With momentum "
                          "that is not an established batch-sharpness threshold (agents/probes.py, "
                          "`Prober.probe`): expect a ratio near 1 only with large batches."]
    table = raw_table(groups)
    if table:
        lines += ["", "### Hessian λ₁ (raw) under an adaptive optimiser", ""] + table
    return lines + [""]


def report_rows(specs: Sequence[RunSpec], results: Dict[str, RunResult]) -> List[Dict[str, Any]]:
    rows = []
    for spec in specs:
        result = results.get(spec.key)
        summary = summarize_run(spec.run_dir)
        if summary["status"] in FINISHED:
            status = summary["status"]
        elif result is not None:
            status = result.status
        else:  # not run by this invocation: did an earlier one start it?
            status = "interrupted" if RunDir(spec.run_dir).metrics.is_file() else "not run"
        wall = summary["wall_seconds"] if summary["wall_seconds"] is not None else (result.seconds if result else None)
        rows.append({"stage": spec.stage, "run": spec.name, "values": spec.values, "status": status,
                     "skipped": bool(result and result.skipped), "wall_seconds": wall,
                     "note": result.note if result else "", **{k: v for k, v in summary.items()
                                                              if k not in ("status", "wall_seconds")}})
    return rows


def status_counts(rows: Sequence[Dict[str, Any]]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return dict(sorted(counts.items()))


def run_commands_section(specs: Sequence[RunSpec]) -> List[str]:
    """What each run ran: per stage its base and the overrides all its runs share, then each
    run's own overrides (the full list would repeat the shared ones on every line)."""
    lines = ["## Runs", "", "Each run is `eosrl train BASE --run-dir STUDY_DIR/STAGE/RUN "
             "--no-progress --set KEY=VALUE ...` with these overrides:", ""]
    for stage in dict.fromkeys(s.stage for s in specs):
        group = [s for s in specs if s.stage == stage]
        shared = [a for a in group[0].set_args() if all(a in s.set_args() for s in group)]
        lines.append(f"- stage `{stage}`, base `{group[0].base}`: " + (" ".join(f"`{a}`" for a in shared) or "–"))
        for spec in group:
            own = [a for a in spec.set_args() if a not in shared]
            lines.append(f"  - `{spec.name}`: " + (" ".join(f"`{a}`" for a in own) or "–"))
    return lines


def draw_figures(groups: Sequence[Group], plots: Path) -> List[Tuple[str, Optional[Path], str]]:
    """(title, PNG or None when there is nothing to draw, caption) of each figure."""
    # matplotlib only when a report is written, not whenever `eosrl` starts.
    from eosrl.launch.study.figures import plot_returns_across_seeds, plot_sharpness_across_seeds, ratios_span_decades
    figures: List[Tuple[str, Optional[Path], str]] = []
    for field, name in SHARPNESS_FIELDS.items():
        path = plot_sharpness_across_seeds(groups, plots / f"{field}_over_threshold.png", field)
        if path is None and field != "sharpness":
            continue  # batch sharpness only where the probes record it
        figures.append((f"{_capital(name)} over the stability threshold", path,
                        f"{name}/threshold against learner updates: a panel per value of the grid axes other "
                        "than `agent.kind`, a colour per agent. Each seed thin; bold: the median over the seeds "
                        "probed at that update; band: min–max over seeds; dashed: the threshold (ratio 1); "
                        "grey: within ±10 % of it; ×: a seed diverged (level with its last finite probe). "
                        "The axis turns logarithmic when the ratios span two decades."))
        if field == "sharpness" and path is not None and ratios_span_decades(groups, field):
            figures.append((f"{_capital(name)} over the stability threshold, linear axis",
                            plot_sharpness_across_seeds(groups, plots / f"{field}_over_threshold_linear.png", field,
                                                        linear=True),
                            "The same on a linear axis from 0 (to the highest ratio, at least 1.25, at most 2; "
                            "higher ones leave the frame): how close to the threshold each group comes, which "
                            "the logarithmic axis above compresses."))
    figures.append(("Final evaluation return across seeds",
                    plot_returns_across_seeds(groups, plots / "final_returns.png"),
                    "Per group the IQM over seeds of the final evaluation return (filled) with its 95 % "
                    "stratified bootstrap CI, and each seed's value (hollow; ×: a diverged seed's last "
                    "periodic evaluation); the returns are those of the table above."))
    return figures


def write_report(study: dict, study_path: Path, study_dir: Path, specs: Sequence[RunSpec],
                 results: Dict[str, RunResult]) -> Path:
    """STUDY_DIR/report.md with the run table and the figures (PNG in STUDY_DIR/plots/)."""
    study_dir = Path(study_dir)
    plots = study_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    rows = report_rows(specs, results)
    groups = group_runs(specs)
    figures = draw_figures(groups, plots)
    counts = status_counts(rows)
    lines = [f"# Study {study['name']}", "",
             f"Study file `{study_path}`; {len(rows)} runs "
             f"({', '.join(f'{n} {s}' for s, n in counts.items())}); "
             f"written {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    lines += across_seeds_section(groups)
    lines += ["## Every run", "",
              "| stage | run | grid values | status | final eval return | max sharpness "
             "| probes with λ₁/threshold > 1 | divergence step | wall time (s) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        frac = "–" if r["fraction_over_threshold"] is None else \
            f"{r['fraction_over_threshold']:.2f} ({r['probes_over_threshold']}/{r['probes']})"
        status = r["status"] + (" (earlier)" if r["skipped"] else "")
        lines.append(f"| {r['stage']} | [{r['run']}]({r['stage']}/{r['run']}) | {_values_text(r['values'])} "
                     f"| {status} | {_fmt(r['final_eval_return'])} | {_fmt(r['max_sharpness'], 3)} | {frac} "
                     f"| {_fmt(r['divergence_step'])} | {_fmt(r['wall_seconds'], 0)} |")
    problems = [r for r in rows if r["status"] in ("failed", "blocked", "not run", "interrupted")]
    if problems:
        lines += ["", "## Runs that did not finish", ""]
        for r in problems:
            why = r["note"] or f"see [{r['stage']}/{r['run']}/train.log]({r['stage']}/{r['run']}/train.log)"
            lines.append(f"- {r['stage']}/{r['run']}: {r['status']}; {why}")
    lines += ["", "## Figures", ""]
    for title, path, caption in figures:
        if path is None:
            lines.append(f"- {title}: no data to plot")
        else:
            lines += [f"### {title}", "", f"![{title}](plots/{path.name})", "", caption, ""]
    lines += run_commands_section(specs)
    path = study_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
