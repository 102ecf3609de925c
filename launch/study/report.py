"""A study's report: STUDY_DIR/report.md with a row per run (status, final return,
sharpness, divergence, wall time), the runs that did not finish, the figures (drawn by
launch/plot.py into STUDY_DIR/plots/) and what each run ran. See docs/study.md.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from eosrl.launch.rundir import RunDir
from eosrl.launch.study.spec import FINISHED, RunResult, RunSpec, summarize_run


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def _values_text(values: Dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "–"



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


def write_report(study: dict, study_path: Path, study_dir: Path, specs: Sequence[RunSpec],
                 results: Dict[str, RunResult]) -> Path:
    """STUDY_DIR/report.md with the run table and the figures (PNG in STUDY_DIR/plots/)."""
    study_dir = Path(study_dir)
    plots = study_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    # matplotlib only when a report is written, not whenever `eosrl` starts.
    from eosrl.launch.plot import plot_final_returns, plot_sharpness_by_regime
    rows = report_rows(specs, results)
    figures = [("Sharpness over the stability threshold, per regime",
                plot_sharpness_by_regime(specs, plots / "sharpness_by_regime.png")),
               ("Final evaluation return per run", plot_final_returns(rows, plots / "final_returns.png"))]
    counts = status_counts(rows)
    lines = [f"# Study {study['name']}", "",
             f"Study file `{study_path}`; {len(rows)} runs "
             f"({', '.join(f'{n} {s}' for s, n in counts.items())}); "
             f"written {time.strftime('%Y-%m-%d %H:%M')}.", "",
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
    for title, path in figures:
        if path is None:
            lines.append(f"- {title}: no data to plot")
        else:
            lines += [f"### {title}", "", f"![{title}](plots/{path.name})", ""]
    lines += run_commands_section(specs)
    path = study_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
