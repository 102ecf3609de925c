"""`eosrl plot`: PNG figures of one or more runs, read from RUN_DIR/metrics.jsonl.

Figures (several runs share each figure; legends use the run directory names):
  sharpness.png    probe λ₁ vs learner updates, with the optimiser's stability
                   threshold dashed in the same colour, and the batch sharpness
                   (probe.batch_sharpness_batches) dash-dotted in a colour of its own
  eigenvalues.png  the top-k probe eigenvalues vs learner updates, one panel per run
  loss.png         train loss vs learner updates
  returns.png      eval mean return and recent training return vs env steps

`eosrl study`'s report figures are drawn by launch/study/figures.py.

A figure of `eosrl plot` whose records no run has is skipped, and the reason is
kept in the returned list's `skipped` attribute. Malformed metrics lines are skipped with
a warning naming the file and line.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters
import matplotlib.pyplot as plt  # noqa: E402

from eosrl.launch import rundir  # noqa: E402

Record = Dict[str, Any]  # one metrics.jsonl line


class Plots(list):
    """The written PNG paths; `skipped` maps each figure not written to why."""

    def __init__(self, paths: Iterable[Path] = (), skipped: Optional[Dict[str, str]] = None):
        super().__init__(paths)
        self.skipped: Dict[str, str] = dict(skipped or {})


# ----------------------------------------------------------------------------
# Reading.


def read_metrics(path: Path) -> List[Record]:
    """The run's history: records a resume superseded are left out."""
    return rundir.without_superseded(rundir.read_metrics(path))


def _scale_axes(fig, ax, plotted: List[float]) -> bool:
    """Log y when the values span decades, learner updates on x; False (and the
    figure closed) when nothing was plotted."""
    if not plotted:
        plt.close(fig)
        return False
    if spans_decades(plotted):
        ax.set_yscale("log")
    ax.set_xlabel("learner updates")
    return True


def series(records: Sequence[Record], kind: str, x_key: str,
           y_of: Callable[[Record], object]) -> Tuple[List[float], List[float]]:
    """(x, y) of the records of one kind that have both values, sorted by x."""
    points = []
    for r in records:
        if r.get("kind") != kind:
            continue
        x, y = rundir.number(r.get(x_key)), rundir.number(y_of(r))
        if x is not None and y is not None:
            points.append((x, y))
    points.sort(key=lambda p: p[0])
    return [p[0] for p in points], [p[1] for p in points]


def run_names(run_dirs: Sequence[Path]) -> List[str]:
    """Directory names, with the parent prepended where two runs share a name."""
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{Path(d).resolve().parent.name}/{Path(d).resolve().name}" for d in run_dirs]


# ----------------------------------------------------------------------------
# Figures.


def spans_decades(values: Iterable[float], decades: float = 2.0) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    if not finite or min(finite) <= 0:
        return False
    return math.log10(max(finite) / min(finite)) >= decades


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _colors(n: int) -> List:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(n)]


def plot_sharpness(runs: Dict[str, List[Record]], path: Path) -> Optional[Path]:
    """λ₁ of the probe batch per run (solid, the run's colour), its threshold (dashed), and
    where the probes measured it the batch sharpness (dash-dotted, with dots, in a colour
    of its own per run, after the runs' colours)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted: List[float] = []
    preconditioned = batch_sharpness = False
    # A constant threshold is keyed by its value, one that moves (an lr schedule) by its series.
    thresholds: Dict[tuple, List[Tuple[str, object, List[float], List[float]]]] = {}
    colors = _colors(2 * len(runs))
    for i, (name, records) in enumerate(runs.items()):
        color = colors[i]
        x, y = series(records, "probe", "step", lambda r: r.get("sharpness"))
        if not x:
            continue
        preconditioned |= any(r.get("preconditioned") for r in records if r.get("kind") == "probe")
        bx, by = series(records, "probe", "step", lambda r: r.get("batch_sharpness"))
        ax.plot(x, y, color=color, label=f"{name} λ₁ (probe batch)" if bx else f"{name} λ₁")
        if bx:
            batch_sharpness = True
            ax.plot(bx, by, color=colors[len(runs) + i], ls="-.", marker="." if len(bx) <= 50 else None,
                    label=f"{name} batch sharpness")
            plotted += by
        tx, ty = series(records, "probe", "step", lambda r: r.get("threshold"))
        if tx:
            key = (ty[0],) if len(set(ty)) == 1 else (tuple(tx), tuple(ty))
            thresholds.setdefault(key, []).append((name, color, tx, ty))
        plotted += y + ty
    # Runs with the same constant threshold (same optimiser and lr) share one dashed line.
    for key, owners in thresholds.items():
        name, color, tx, ty = owners[0]
        if len(owners) > 1:  # then the key is the one constant threshold
            tx = [min(o[2][0] for o in owners), max(o[2][-1] for o in owners)]
            ty = [key[0], key[0]]  # type: ignore[list-item]  # a constant's key is (value,)
        label = f"{name} threshold" if len(owners) == 1 else "threshold (" + ", ".join(o[0] for o in owners) + ")"
        ax.plot(tx, ty, color=color if len(owners) == 1 else "k", ls="--", label=label)
    if not _scale_axes(fig, ax, plotted):
        return None
    quantity = "λ₁ and batch sharpness" if batch_sharpness else "sharpness λ₁"
    ax.set_ylabel(f"{quantity} of P⁻¹H (preconditioned)" if preconditioned
                  else f"{quantity} of the TD-loss Hessian")
    ax.set_title("Sharpness vs stability threshold")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_eigenvalues(runs: Dict[str, List[Record]], path: Path) -> Optional[Path]:
    with_probes = {name: [r for r in records if r.get("kind") == "probe"
                          and isinstance(r.get("eigenvalues"), list)]
                   for name, records in runs.items()}
    with_probes = {name: probes for name, probes in with_probes.items() if probes}
    if not with_probes:
        return None
    fig, axes = plt.subplots(1, len(with_probes), figsize=(5 * len(with_probes), 4),
                             sharey=True, squeeze=False)
    for ax, (name, probes) in zip(axes[0], with_probes.items()):
        num = max(len(r["eigenvalues"]) for r in probes)
        for i in range(num):
            def eigenvalue(r: Record, i: int = i) -> Any:
                values = r["eigenvalues"]
                return values[i] if i < len(values) else None
            x, y = series(probes, "probe", "step", eigenvalue)
            line, = ax.plot(x, y, label=f"λ{i + 1}")
            # A pair whose residual exceeded probe.tolerance is drawn, but marked.
            loose = [(r["step"], r["eigenvalues"][i]) for r in probes
                     if i < len(r.get("converged", [])) and not r["converged"][i]]
            if loose:
                ax.scatter(*zip(*loose), marker="x", color=line.get_color(), zorder=3,
                           label=f"λ{i + 1}: residual above probe.tolerance")
        operator = next((r.get("operator") for r in reversed(probes) if r.get("operator")), None)
        if operator is None and any(r.get("preconditioned") for r in probes):
            operator = "P⁻¹ H"  # records written before the operator was named
        ax.set_title(f"{name} (eigenvalues of {operator})" if operator and operator != "H" else name)
        ax.set_xlabel("learner updates")
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("Hessian eigenvalue")
    return _save(fig, path)


def plot_loss(runs: Dict[str, List[Record]], path: Path) -> Optional[Path]:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted: List[float] = []
    for name, records in runs.items():
        x, y = series(records, "train", "step", lambda r: r.get("loss"))
        if x:
            ax.plot(x, y, label=name)
            plotted += y
    if not _scale_axes(fig, ax, plotted):
        return None
    ax.set_ylabel("TD loss (mean over batch)")
    ax.set_title("Training loss")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_returns(runs: Dict[str, List[Record]], path: Path) -> Optional[Path]:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    anything = False
    for (name, records), color in zip(runs.items(), _colors(len(runs))):
        x, y = series(records, "train", "env_steps", lambda r: r.get("return"))
        if x:
            ax.plot(x, y, color=color, alpha=0.4, lw=1, label=f"{name} (training episodes)")
            anything = True
        x, y = series(records, "eval", "env_steps", lambda r: r.get("return_mean"))
        if x:
            ax.plot(x, y, color=color, marker="o", ms=3, label=f"{name} (evaluation mean)")
            anything = True
        random = [r["return_mean"] for r in records if r.get("kind") == "event" and r.get("event") == "random_policy"]
        if random and anything:
            ax.axhline(random[-1], color=color, ls=":", lw=1, label=f"{name} (random policy)")
    if not anything:
        plt.close(fig)
        return None
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return (undiscounted, unclipped)")
    ax.set_title("Returns")
    ax.legend(fontsize="small")
    return _save(fig, path)


FIGURES = {
    "sharpness.png": (plot_sharpness, "no probe records with 'sharpness'"),
    "eigenvalues.png": (plot_eigenvalues, "no probe records with 'eigenvalues'"),
    "loss.png": (plot_loss, "no train records with 'loss'"),
    "returns.png": (plot_returns, "no eval 'return_mean' or train 'return' with 'env_steps'"),
}


def plot_runs(run_dirs: List[Path], out_dir: Path | None = None) -> List[Path]:
    """Writes the figures of `run_dirs` into `out_dir` (default: the first
    run's plots/ directory) and returns the paths written, as a `Plots` list
    whose `skipped` attribute says which figures were not written and why."""
    if not run_dirs:
        raise ValueError("plot_runs: no run directories given")
    run_dirs = [Path(d) for d in run_dirs]
    out_dir = Path(out_dir) if out_dir is not None else run_dirs[0] / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: Dict[str, List[Record]] = {}
    for name, run_dir in zip(run_names(run_dirs), run_dirs):
        metrics = rundir.RunDir(run_dir).metrics
        if not metrics.is_file():
            warnings.warn(f"{metrics}: not found; run skipped")
            continue
        runs[name] = read_metrics(metrics)
    result = Plots()
    for filename, (plot_fn, reason) in FIGURES.items():
        written = plot_fn(runs, out_dir / filename) if runs else None
        if written is None:
            result.skipped[filename] = reason if runs else "no readable metrics.jsonl"
        else:
            result.append(written)
    return result
