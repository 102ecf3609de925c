"""`eosrl study STUDY.yaml`: a set of training runs declared in one YAML file,
run stage by stage as `eosrl train` subprocesses, then summarised in a report.

Study file
----------
    name: eos_regimes                 # the study directory is runs/<name> unless --out
    base: configs/dqn_minatar_breakout.yaml
    set:                              # overrides applied to every run (optional)
      run.eval_episodes: 5            # dotted keys, or nested mappings: {run: {eval_episodes: 5}}
    stages:                           # run in order; a stage starts when the one before has ended
      - name: record
        runs:                         # explicit runs: a name and their own overrides
          - name: collect
            set: {replay.record_to: "{run_dir}/dataset"}
      - name: regimes
        set: {probe.enabled: true}    # overrides of every run of this stage (optional)
        base: configs/...yaml         # a stage may replace the study's base (optional)
        grid:                         # the cartesian product of the axes, in the order written
          agent.kind: [dqn, c51]      # an axis is a config key and its values ...
          regime:                     # ... or a name whose values are mappings with a `label`
            - {label: online, mode: online}
            - {label: offline, mode: offline, dataset: "{run:collect}/dataset",
               run.total_updates: 5000}

Inside a labelled mapping a key without a dot is taken inside the axis name
(`mode` under the axis `regime` sets `regime.mode`); a dotted key is a full
config key (`run.total_updates`). Later overrides win: study `set` < stage
`set` < a run's `set` or its grid values (axes in order).

`base` paths are relative to the current directory, the study file's directory
or the eosrl project root, whichever holds the file first.

Substitution: string values may contain
    {study_dir}      the study directory (absolute)
    {run_dir}        this run's own directory
    {run:NAME}       the directory of a run of an earlier stage, NAME being
                     `stage/run` or just `run` when that is unambiguous
Nothing else in braces is touched. A run that names `{run:NAME}` depends on
it: when NAME neither completed nor diverged, the run is not started (status
`blocked`).

Runs
----
Each run lives in STUDY_DIR/<stage>/<run name>; a grid run's name joins its
values with `_`: a label or a string value as it is (`dqn`, `offline-first`),
any other value as `<last key part>-<value>` (`lr-0.001`, `seed-1`), made
filesystem-safe. A run is `python -m launch.cli train BASE --run-dir DIR
--set k=v ... --no-progress`, its output in DIR/train.log; `--parallel K` runs
K of a stage at once. A run dir that already holds a finished run (its last
event is `finished` with status completed or diverged) is skipped, so running
the study again resumes it, or only rebuilds the report. A run dir left by an
unfinished attempt (a crash, Ctrl-C) continues from its last checkpoint with
`eosrl train --resume` when its config.yaml is still the run's config;
otherwise it is cleared and the run starts over. Runs resume with the replay
they checkpointed (`replay.checkpoint`); without it an online run refills
replay to `min_size` before learning again, and an offline run reloads its
dataset; a recording run appends to its dataset. A run that fails is
reported with its log and the study carries on; so does a diverged run.

Every run's config is built and validated before the first run starts, so a
typo in a key fails at once with one line. Ctrl-C (or SIGTERM) stops the runs
in flight cleanly and still writes the report.

Report
------
STUDY_DIR/report.md: a row per run (stage, run, grid values, status, final
evaluation return, max sharpness λ₁, the fraction of probes with
sharpness_over_threshold > 1, the divergence step, wall time), the runs that
did not finish with their logs, and two figures in STUDY_DIR/plots/:
sharpness_by_regime.png (λ₁/threshold vs learner updates, a panel per value of
the grid axis `regime` (or `regime.*`; else per regime.mode), a line per agent
kind) and final_returns.png (a bar per run). The study file is copied to
STUDY_DIR/study.yaml.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from agents import checkpoint
from agents.config import Config, ConfigError, load_config
from launch.lifeline import child_environment
from launch.rundir import number, read_metrics

ROOT = Path(__file__).resolve().parents[1]
FINISHED = ("completed", "diverged")  # statuses of a run that need not run again
SAFE = re.compile(r"[^A-Za-z0-9._+-]+")
PLACEHOLDER = re.compile(r"\{(study_dir|run_dir|run:[^{}]+)\}")


class StudyError(ConfigError):
    """A study file that cannot run; the message names the file and the place."""


@dataclasses.dataclass
class RunSpec:
    """One planned run: where it lives and what it overrides (placeholders resolved)."""
    stage: str
    name: str
    base: Path
    run_dir: Path
    values: Dict[str, str] = dataclasses.field(default_factory=dict)  # grid axis -> label
    overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)  # dotted key -> value
    deps: List[str] = dataclasses.field(default_factory=list)  # keys of runs it reads
    config: Optional[Config] = None

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.name}"

    def set_args(self) -> List[str]:
        return [f"{k}={yaml_value(v)}" for k, v in self.overrides.items()]

    def command(self, resume: bool = False) -> List[str]:
        if resume:  # the run dir's config.yaml is this run's config (see `resumable`)
            return [sys.executable, "-m", "launch.cli", "train", "--resume", str(self.run_dir), "--no-progress"]
        cmd = [sys.executable, "-m", "launch.cli", "train", str(self.base),
               "--run-dir", str(self.run_dir), "--no-progress"]
        for item in self.set_args():
            cmd += ["--set", item]
        return cmd


@dataclasses.dataclass
class RunResult:
    spec: RunSpec
    status: str  # completed | diverged | interrupted | failed | blocked | not run
    skipped: bool = False  # finished before this invocation
    resumed: bool = False  # continued an unfinished attempt from its checkpoint
    returncode: Optional[int] = None
    seconds: Optional[float] = None
    note: str = ""

    @property
    def log(self) -> Path:
        return self.spec.run_dir / "train.log"


# ----------------------------------------------------------------------------
# The study file: names, grids, substitution (pure functions).


def safe_name(text: str) -> str:
    """A filesystem-safe run name: runs of other characters become '-'."""
    name = SAFE.sub("-", str(text)).strip("-.")
    return name or "run"


def yaml_value(value: Any) -> str:
    """`value` as `--set` reads it back (parse_overrides applies yaml.safe_load)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text


def flatten(mapping: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{agent: {optimizer: {lr: 1}}} and {agent.optimizer.lr: 1} both give the dotted form.
    No config field holds a mapping, so every nested mapping is a section."""
    flat: Dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def axis_values(axis: str, values: Any, where: str) -> List[Tuple[str, str, Dict[str, Any]]]:
    """(label, name part, overrides) of each value of one grid axis."""
    if not isinstance(values, list) or not values:
        raise StudyError(f"{where}: a grid axis needs a non-empty list of values")
    out = []
    for i, value in enumerate(values):
        if isinstance(value, dict):
            if "label" not in value:
                raise StudyError(f"{where}[{i}]: a mapping value needs a 'label' (its name in run names)")
            label = _label(value["label"])
            rest = {k: v for k, v in value.items() if k != "label"}
            # A dotless key lives inside the axis (`mode` under `regime`); a dotted one is a full key.
            overrides = {}
            for key, v in flatten({k if "." in k else f"{axis}.{k}": v for k, v in rest.items()}).items():
                overrides[key] = v
            out.append((label, safe_name(label), overrides))
        else:
            label = _label(value)
            part = label if isinstance(value, str) else f"{axis.split('.')[-1]}-{label}"
            out.append((label, safe_name(part), {axis: value}))
    labels = [o[1] for o in out]
    if len(set(labels)) != len(labels):
        raise StudyError(f"{where}: two values give the same name part ({', '.join(labels)})")
    return out


def expand_grid(grid: Dict[str, Any], where: str = "grid") -> List[Tuple[str, Dict[str, str], Dict[str, Any]]]:
    """(run name, {axis: label}, overrides) of each point of the cartesian product."""
    if not isinstance(grid, dict) or not grid:
        raise StudyError(f"{where}: expected a mapping of axis -> list of values")
    axes = [(axis, axis_values(axis, values, f"{where}.{axis}")) for axis, values in grid.items()]
    points = []
    for combo in itertools.product(*(vals for _, vals in axes)):
        values, overrides, parts = {}, {}, []
        for (axis, _), (label, part, sets) in zip(axes, combo):
            values[axis] = label
            overrides.update(sets)
            parts.append(part)
        points.append(("_".join(parts), values, overrides))
    return points


def substitute(value: Any, context: Dict[str, str], where: str = "value") -> Tuple[Any, List[str]]:
    """(value with placeholders replaced, keys of the runs it names). `context` maps
    `study_dir`, `run_dir` and `run:NAME` (each earlier run, by `stage/run` and,
    when unambiguous, by `run`) to paths; lists are substituted item by item."""
    if isinstance(value, list):
        pairs = [substitute(v, context, where) for v in value]
        return [p[0] for p in pairs], [d for p in pairs for d in p[1]]
    if not isinstance(value, str):
        return value, []
    deps: List[str] = []

    def replace(match: re.Match) -> str:
        token = match.group(1)
        if token not in context:
            if token.startswith("run:"):
                known = sorted(k[4:] for k in context if k.startswith("run:") and "/" in k)
                raise StudyError(f"{where}: {{{token}}} names no run of an earlier stage "
                                 f"(earlier runs: {', '.join(known) or 'none'})")
            raise StudyError(f"{where}: {{{token}}} is not available here")
        if context[token] is None:
            raise StudyError(f"{where}: {{{token}}} is ambiguous; write {{run:STAGE/RUN}}")
        if token.startswith("run:"):
            deps.append(context[f"key:{token}"])
        return context[token]

    return PLACEHOLDER.sub(replace, value), deps


# ----------------------------------------------------------------------------
# Planning: the study file -> run specs.


def _check_keys(data: Any, allowed: Sequence[str], where: str) -> None:
    if not isinstance(data, dict):
        raise StudyError(f"{where}: expected a mapping")
    for key in data:
        if key not in allowed:
            raise StudyError(f"{where}: unknown key '{key}' (valid keys: {', '.join(allowed)})")


def _sets(data: dict, where: str) -> Dict[str, Any]:
    value = data.get("set") or {}
    if not isinstance(value, dict):
        raise StudyError(f"{where}.set: expected a mapping of config key -> value")
    return flatten(value)


def resolve_base(base: Any, study_path: Path, where: str) -> Path:
    if not isinstance(base, str) or not base:
        raise StudyError(f"{where}.base: expected the path of a config file")
    for root in (Path.cwd(), study_path.parent, ROOT):
        candidate = (root / base).resolve()
        if candidate.is_file():
            return candidate
    raise StudyError(f"{where}.base: {base} not found (relative to the current directory, "
                     f"{study_path.parent} or {ROOT})")


def load_study(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise StudyError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    _check_keys(data, ("name", "base", "set", "stages"), str(path))
    for key in ("name", "base", "stages"):
        if key not in data:
            raise StudyError(f"{path}: missing '{key}'")
    if safe_name(data["name"]) != str(data["name"]):
        raise StudyError(f"{path}: name {data['name']!r} must use only letters, digits and . _ + -")
    if not isinstance(data["stages"], list) or not data["stages"]:
        raise StudyError(f"{path}: stages: expected a non-empty list")
    return data


def _stage_points(stage: dict, where: str) -> List[Tuple[str, Dict[str, str], Dict[str, Any]]]:
    """(run name, grid values, overrides) of a stage's runs, before substitution."""
    if ("runs" in stage) == ("grid" in stage):
        raise StudyError(f"{where}: give either 'runs' or 'grid'")
    if "grid" in stage:
        return expand_grid(stage["grid"], f"{where}.grid")
    runs = stage["runs"]
    if not isinstance(runs, list) or not runs:
        raise StudyError(f"{where}.runs: expected a non-empty list of {{name, set}}")
    points = []
    for i, run in enumerate(runs):
        _check_keys(run, ("name", "set"), f"{where}.runs[{i}]")
        name = str(run.get("name", ""))
        if not name or safe_name(name) != name:
            raise StudyError(f"{where}.runs[{i}].name: {name!r} must be a non-empty name "
                             "of letters, digits and . _ + -")
        points.append((name, {}, _sets(run, f"{where}.runs[{i}]")))
    return points


def plan_study(study: dict, study_path: Path, study_dir: Path, validate: bool = True) -> List[RunSpec]:
    """Every run of the study, in order, with placeholders resolved and (when
    `validate`) its config built and checked, as `eosrl train` will build it."""
    study_dir = Path(study_dir).resolve()
    where = str(study_path)
    common = _sets(study, where)
    specs: List[RunSpec] = []
    earlier: Dict[str, Optional[str]] = {}  # placeholder token -> path (None: ambiguous)
    stage_names = set()
    for s, stage in enumerate(study["stages"]):
        swhere = f"{where}: stages[{s}]"
        _check_keys(stage, ("name", "base", "set", "runs", "grid"), swhere)
        stage_name = str(stage.get("name", ""))
        if not stage_name or safe_name(stage_name) != stage_name or stage_name in stage_names:
            raise StudyError(f"{swhere}.name: {stage_name!r} must be a new name of letters, digits and . _ + -")
        stage_names.add(stage_name)
        base = resolve_base(stage.get("base", study["base"]), study_path, swhere)
        stage_sets = _sets(stage, swhere)
        this_stage: Dict[str, str] = {}
        names = set()
        for name, values, overrides in _stage_points(stage, swhere):
            if name in names:
                raise StudyError(f"{swhere}: two runs named {name!r}")
            names.add(name)
            run_dir = study_dir / stage_name / name
            context = {"study_dir": str(study_dir), "run_dir": str(run_dir), **earlier}
            merged = {**common, **stage_sets, **overrides}
            resolved, deps = {}, []
            for key, value in merged.items():
                resolved[key], used = substitute(value, context, f"{swhere} run {name}: {key}")
                deps += [d for d in used if d not in deps]
            spec = RunSpec(stage_name, name, base, run_dir, values, resolved, deps)
            if validate:
                try:
                    spec.config = load_config(base, spec.set_args())
                except ConfigError as e:
                    raise StudyError(f"{where}: run {spec.key}: {e}") from None
            specs.append(spec)
            this_stage[name] = str(run_dir)
        # Runs of this stage become referable from the next stage on.
        for name, path in this_stage.items():
            earlier[f"run:{stage_name}/{name}"] = path
            earlier[f"key:run:{stage_name}/{name}"] = f"{stage_name}/{name}"
            short = f"run:{name}"
            if short in earlier:
                earlier[short] = None  # the same name in two stages: ask for stage/run
            else:
                earlier[short] = path
                earlier[f"key:{short}"] = f"{stage_name}/{name}"
    return specs


# ----------------------------------------------------------------------------
# Reading run directories.


def read_records(run_dir: Path) -> List[Dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return list(read_metrics(path)) if path.is_file() else []


def finished_status(run_dir: Path) -> Optional[str]:
    """The status of the run's `finished` event when it is the last event, else None."""
    events = [r for r in read_records(run_dir) if r.get("kind") == "event"]
    if events and events[-1].get("event") == "finished":
        return events[-1].get("status")
    return None


def is_finished(run_dir: Path) -> bool:
    return finished_status(run_dir) in FINISHED


def summarize_run(run_dir: Path) -> Dict[str, Any]:
    """The report's numbers of one run dir (None where the records have none)."""
    records = read_records(run_dir)
    events = [r for r in records if r.get("kind") == "event"]
    finished = events[-1] if events and events[-1].get("event") == "finished" else {}
    divergence = next((r for r in events if r.get("event") == "divergence"), None)
    probes = [r for r in records if r.get("kind") == "probe"]
    sharpness = [v for v in (number(r.get("sharpness")) for r in probes) if v is not None and math.isfinite(v)]
    ratios = [number(r.get("sharpness_over_threshold")) for r in probes]
    over = sum(1 for v in ratios if v is not None and v > 1)
    final = number(finished.get("final_eval_return"))
    if final is None:  # e.g. a diverged run: its last periodic evaluation
        evals = [number(r.get("return_mean")) for r in records if r.get("kind") == "eval"]
        evals = [v for v in evals if v is not None]
        final = evals[-1] if evals else None
    return {
        "status": finished.get("status"),
        "final_eval_return": final,
        "max_sharpness": max(sharpness) if sharpness else None,
        "probes": len(probes),
        "probes_over_threshold": over,
        "fraction_over_threshold": over / len(probes) if probes else None,
        "divergence_step": divergence.get("step") if divergence else None,
        "wall_seconds": number(finished.get("wall_seconds")),
        "learner_updates": finished.get("learner_updates"),
    }


# ----------------------------------------------------------------------------
# Running.


class Runner:
    """Runs specs as `eosrl train` subprocesses, K at once; stops them on request."""

    def __init__(self, parallel: int = 1, echo=print):
        self.parallel = max(1, int(parallel))
        self.echo = echo
        self.results: Dict[str, RunResult] = {}
        self.stopping = threading.Event()
        self._procs: Dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self.done = 0
        self.total = 0
        self.started = time.time()

    def _report(self, result: RunResult) -> None:
        with self._lock:
            self.done += 1
            self.results[result.spec.key] = result
            elapsed = (time.time() - self.started) / 60
            self.echo(f"[{self.done}/{self.total}] {result.spec.key}: {describe(result)}  "
                      f"({elapsed:.1f} min elapsed)")

    def run_stage(self, specs: List[RunSpec]) -> None:
        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            futures = [pool.submit(self.execute, spec) for spec in specs]
            try:
                for future in as_completed(futures):
                    self._report(future.result())
            except BaseException:
                self.stop()
                pool.shutdown(wait=True, cancel_futures=True)
                for future in futures:  # keep what the stopped runs said, for the report
                    if future.done() and not future.cancelled() and future.exception() is None:
                        result = future.result()
                        self.results.setdefault(result.spec.key, result)
                raise

    def stop(self) -> None:
        """Ends what runs now the clean way (train treats SIGTERM as Ctrl-C); starts nothing more."""
        self.stopping.set()
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def execute(self, spec: RunSpec) -> RunResult:
        status = finished_status(spec.run_dir)
        if status in FINISHED:
            return RunResult(spec, status, skipped=True)
        blocked = [d for d in spec.deps if self.results.get(d) is None
                   or self.results[d].status not in FINISHED]
        if blocked:
            return RunResult(spec, "blocked", note=f"needs {', '.join(blocked)}, which did not finish")
        if self.stopping.is_set():
            return RunResult(spec, "not run", note="the study was stopped")
        resume = resumable(spec)
        if not resume:
            clear_unfinished(spec.run_dir)
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        env = child_environment(os.environ)  # the run ends if the study is killed
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        start = time.time()
        with open(spec.run_dir / "train.log", "a" if resume else "w") as log:
            if resume:
                log.write(f"\n--- eosrl study: resuming from {checkpoint.latest(spec.run_dir / 'checkpoints')}\n")
                log.flush()
            # Its own session, so a Ctrl-C meant for the study reaches runs only through stop().
            proc = subprocess.Popen(spec.command(resume), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=ROOT, env=env, start_new_session=True)
            with self._lock:
                self._procs[proc.pid] = proc
                verb = "resumed" if resume else "started"
                self.echo(f"  {verb} {spec.key}  (log: {spec.run_dir / 'train.log'})")
            if self.stopping.is_set():  # stop() ran between the check above and Popen
                proc.send_signal(signal.SIGTERM)
            try:
                returncode = proc.wait()
            finally:
                with self._lock:
                    self._procs.pop(proc.pid, None)
        seconds = time.time() - start
        status = finished_status(spec.run_dir)
        if status not in FINISHED + ("interrupted",):
            # Stopped by the study (a SIGTERM outside train's loop ends it without a record) or failed.
            status = "interrupted" if self.stopping.is_set() else "failed"
        return RunResult(spec, status, resumed=resume, returncode=returncode, seconds=seconds)


def resumable(spec: RunSpec) -> bool:
    """Whether an unfinished attempt left a checkpoint of exactly this run's config
    (a study file edited since then starts the run over)."""
    run_dir = spec.run_dir
    if spec.config is None or checkpoint.latest(run_dir / "checkpoints") is None:
        return False
    try:
        return load_config(run_dir / "config.yaml") == spec.config
    except (ConfigError, OSError):
        return False


def clear_unfinished(run_dir: Path) -> None:
    """Removes what an unfinished attempt without a usable checkpoint left (`eosrl
    train` refuses a used run dir)."""
    run_dir = Path(run_dir)
    if run_dir.is_dir() and any((run_dir / f).exists() for f in ("metrics.jsonl", "config.yaml", "train.log")):
        shutil.rmtree(run_dir)


def describe(result: RunResult) -> str:
    if result.skipped:
        return f"skipped, already finished ({result.status})"
    if result.status in ("blocked", "not run"):
        return f"{result.status}: {result.note}"
    took = f" in {result.seconds:.0f} s" if result.seconds is not None else ""
    if result.resumed:
        took += " (resumed from its checkpoint)"
    if result.status == "failed":
        return f"FAILED (exit code {result.returncode}){took}; log: {result.log}"
    summary = summarize_run(result.spec.run_dir)
    text = f"{result.status}{took}"
    if result.status == "diverged":
        text += f" at update {summary['divergence_step']}"
    if summary["final_eval_return"] is not None:
        text += f", final eval return {summary['final_eval_return']:.2f}"
    return text


# ----------------------------------------------------------------------------
# Report and figures.


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def _values_text(values: Dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "–"


def _is_regime_axis(axis: str) -> bool:
    return axis == "regime" or axis.startswith("regime.")


def _panel_of(spec: RunSpec) -> str:
    """The regime a run belongs to in the sharpness figure: the label of its grid
    axis `regime` (or `regime.*`), else its config's regime.mode."""
    for axis, label in spec.values.items():
        if _is_regime_axis(axis):
            return label
    if spec.config is not None:
        return spec.config.regime.mode
    return str(spec.overrides.get("regime.mode", "online"))


def _kind_of(spec: RunSpec) -> str:
    if spec.config is not None:
        return spec.config.agent.kind
    return str(spec.overrides.get("agent.kind", spec.values.get("agent.kind", "?")))


def plot_sharpness_by_regime(specs: Sequence[RunSpec], path: Path) -> Optional[Path]:
    """sharpness/threshold vs learner updates: a panel per regime, a line per agent kind
    (plus any other grid values), an × where a run diverged."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from launch.plot import spans_decades
    # (stage, regime) -> [(line label, steps, ratios, divergence step)]
    lines: Dict[Tuple[str, str], List[Tuple[str, List[float], List[float], Optional[int]]]] = {}
    stages_with_probes = set()
    for spec in specs:
        records = read_records(spec.run_dir)
        ratios = ((r["step"], number(r.get("sharpness_over_threshold"))) for r in records if r.get("kind") == "probe")
        points = sorted((x, y) for x, y in ratios if y is not None and math.isfinite(y))
        if not points:
            continue
        stages_with_probes.add(spec.stage)
        extra = [v for a, v in spec.values.items() if a != "agent.kind" and not _is_regime_axis(a)]
        label = " ".join([_kind_of(spec)] + extra)
        div = next((r["step"] for r in records if r.get("kind") == "event" and r.get("event") == "divergence"), None)
        lines.setdefault((spec.stage, _panel_of(spec)), []).append(
            (label, [p[0] for p in points], [p[1] for p in points], div))
    if not lines:
        return None
    panels = list(lines)
    cols = min(3, len(panels))  # wrap: five regimes side by side would be too wide to read
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), sharey=True, squeeze=False)
    every = [y for group in lines.values() for _, _, ys, _ in group for y in ys]
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    # One colour per line label in every panel, so `dqn` is the same colour throughout.
    labels = list(dict.fromkeys(label for group in lines.values() for label, *_ in group))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {label: cycle[i % len(cycle)] for i, label in enumerate(labels)}
    for ax, key in zip(axes.flat, panels):
        for label, xs, ys, div in lines[key]:
            ax.plot(xs, ys, label=label, lw=1.2, color=color[label], marker="o" if len(xs) <= 30 else None, ms=3)
            if div is not None:  # at the divergence step, level with the last finite probe
                ax.plot([div], [ys[-1]], "x", color=color[label], ms=9, mew=2)
        ax.axhline(1.0, color="k", ls="--", lw=0.8)
        ax.set_title(key[1] if len(stages_with_probes) == 1 else f"{key[0]}: {key[1]}")
        ax.set_xlabel("learner updates")
        ax.legend(fontsize="small")
    # The threshold line counts: ratios far below it (a short run) get a log axis so their trend shows.
    if spans_decades(every + [1.0]):
        axes[0][0].set_yscale("log")
    for row in axes:
        row[0].set_ylabel("sharpness / threshold")
    fig.suptitle("λ₁ / threshold (dashed: the edge of stability; ×: diverged)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


STATUS_COLORS = {"completed": "tab:blue", "diverged": "tab:red"}


def plot_final_returns(rows: Sequence[Dict[str, Any]], path: Path) -> Optional[Path]:
    """A bar per run with a final evaluation return, coloured by status."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    rows = [r for r in rows if r["final_eval_return"] is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(rows) + 2), 4.2))
    colors = [STATUS_COLORS.get(r["status"], "tab:gray") for r in rows]
    ax.bar(range(len(rows)), [r["final_eval_return"] for r in rows], color=colors)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['stage']}/{r['run']}" for r in rows], rotation=60, ha="right", fontsize="small")
    ax.set_ylabel("final evaluation return")
    ax.set_title("Final return per run")
    statuses = sorted({r["status"] for r in rows})
    ax.legend(handles=[Patch(color=STATUS_COLORS.get(s, "tab:gray"), label=s) for s in statuses],
              fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
            status = "interrupted" if (spec.run_dir / "metrics.jsonl").is_file() else "not run"
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
    lines = ["## Runs", "", "Each run is `python -m launch.cli train BASE --run-dir STUDY_DIR/STAGE/RUN "
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


# ----------------------------------------------------------------------------
# Entry points.


def run_study(study_path: str | Path, parallel: int = 1, out: Optional[str | Path] = None,
              dry_run: bool = False, echo=print) -> Dict[str, Any]:
    """Runs (or resumes) the study and writes its report. Returns {study_dir, report,
    rows, counts}; with `dry_run`, prints the plan and runs nothing (report None)."""
    study_path = Path(study_path)
    study = load_study(study_path)
    study_dir = Path(out) if out else Path("runs") / study["name"]
    specs = plan_study(study, study_path, study_dir)
    study_dir = study_dir.resolve()
    if dry_run:
        print_plan(specs, echo)
        return {"study_dir": str(study_dir), "report": None, "rows": [], "counts": {}}
    study_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(study_path, study_dir / "study.yaml")  # what ran, next to its results
    runner = Runner(parallel, echo)
    runner.total = len(specs)
    echo(f"Study {study['name']}: {len(specs)} runs in {len(study['stages'])} stages, "
         f"{runner.parallel} at a time -> {study_dir}")
    from launch.rundir import interrupt_on_stop_signals
    interrupted = False
    try:
        with interrupt_on_stop_signals():
            for stage in dict.fromkeys(s.stage for s in specs):
                runner.run_stage([s for s in specs if s.stage == stage])
    except KeyboardInterrupt:
        interrupted = True
        echo("Interrupted: running runs were stopped; run the study again to continue.")
    report = write_report(study, study_path, study_dir, specs, runner.results)
    rows = report_rows(specs, runner.results)
    counts = status_counts(rows)
    echo(f"Report: {report}  ({', '.join(f'{n} {s}' for s, n in counts.items())})")
    return {"study_dir": str(study_dir), "report": str(report), "rows": rows, "counts": counts,
            "interrupted": interrupted}


def print_plan(specs: Sequence[RunSpec], echo=print) -> None:
    for i, spec in enumerate(specs, start=1):
        status = finished_status(spec.run_dir)
        state = f"skip: already finished ({status})" if status in FINISHED else "to run"
        echo(f"[{i}/{len(specs)}] {spec.key}  ({state})")
        echo(f"    dir  {spec.run_dir}")
        echo("    cmd  python " + " ".join(shlex.quote(c) for c in spec.command()[1:]))


def cmd_study(args) -> int:
    if args.parallel < 1:
        raise StudyError(f"--parallel: must be >= 1, got {args.parallel}")
    result = run_study(args.study, parallel=args.parallel, out=args.out, dry_run=args.dry_run)
    if result.get("interrupted"):
        return 130
    bad = sum(n for s, n in result["counts"].items() if s not in FINISHED)
    return 1 if bad else 0


def add_study_parser(sub) -> argparse.ArgumentParser:
    """Registers `eosrl study` on the subparsers of launch.cli."""
    p = sub.add_parser(
        "study", help="run a study: stages of runs (grids of config values) and a report",
        description="Run the runs of STUDY_YAML stage by stage as `eosrl train` subprocesses "
                    "(a finished run is skipped, so a study resumes), then write "
                    "STUDY_DIR/report.md with a table of all runs and figures. "
                    "The YAML format is described in launch/study.py.")
    p.add_argument("study", metavar="STUDY_YAML", help="study file, e.g. configs/studies/eos_regimes_minatar.yaml")
    p.add_argument("--parallel", type=int, default=1, metavar="K",
                   help="runs of a stage at once (default 1; each run uses several cores)")
    p.add_argument("--out", metavar="DIR", help="study directory (default runs/<study name>)")
    p.add_argument("--dry-run", action="store_true",
                   help="check every run's config and print the plan and commands; run nothing")
    p.set_defaults(func=cmd_study)
    return p

