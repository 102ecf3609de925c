"""The study file and its plan: reading and checking STUDY.yaml, expanding grids and
seeds, substituting {run_dir}/{run:NAME}, and planning every run (RunSpec) with its
config built and validated; also reading a run directory's status and numbers.
The file format and run naming are described in docs/study.md.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from eosrl.launch.config import Config, ConfigError, load_config, read_yaml
from eosrl.launch.rundir import RunDir, number, read_metrics, without_superseded

ROOT = Path(__file__).resolve().parents[2]
FINISHED = ("completed", "diverged")  # statuses of a run that need not run again
SAFE = re.compile(r"[^A-Za-z0-9._+-]+")
PLACEHOLDER = re.compile(r"\{(study_dir|run_dir|run:[^{}]+)\}")
SEED_AXIS = "run.seed"  # the config key `seeds:` sets, and the grid axis a report groups over
SEEDS_VALID = "a count N >= 1 (seeds 0..N-1) or a non-empty list of distinct integers >= 0"


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
    # The run's name without its seed: runs of a stage with the same group differ only by
    # seed, and the report aggregates over them. `seed` is the seed it got from `seeds:` or a
    # `run.seed` grid axis (None: neither; the config's run.seed).
    group: str = ""
    seed: Optional[int] = None

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.name}"

    def set_args(self) -> List[str]:
        return [f"{k}={yaml_value(v)}" for k, v in self.overrides.items()]

    def train_args(self, resume: bool = False) -> List[str]:
        """The `eosrl train ...` arguments of this run (a supervisor.Child runs them)."""
        if resume:  # the run dir's config.yaml is this run's config (see runner.resumable)
            return ["train", "--resume", str(self.run_dir), "--no-progress"]
        args = ["train", str(self.base), "--run-dir", str(self.run_dir), "--no-progress"]
        for item in self.set_args():
            args += ["--set", item]
        return args


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


def _grid_points(grid: Dict[str, Any], where: str) -> List[Tuple[List[Tuple[str, str]], Dict[str, str], Dict[str, Any]]]:
    """([(axis, name part)], {axis: label}, overrides) of each point of the cartesian product."""
    if not isinstance(grid, dict) or not grid:
        raise StudyError(f"{where}: expected a mapping of axis -> list of values")
    axes = [(axis, axis_values(axis, values, f"{where}.{axis}")) for axis, values in grid.items()]
    points = []
    for combo in itertools.product(*(vals for _, vals in axes)):
        values, overrides, parts = {}, {}, []
        for (axis, _), (label, part, sets) in zip(axes, combo):
            values[axis] = label
            overrides.update(sets)
            parts.append((axis, part))
        points.append((parts, values, overrides))
    return points


def expand_grid(grid: Dict[str, Any], where: str = "grid") -> List[Tuple[str, Dict[str, str], Dict[str, Any]]]:
    """(run name, {axis: label}, overrides) of each point of the cartesian product."""
    return [("_".join(p for _, p in parts), values, overrides)
            for parts, values, overrides in _grid_points(grid, where)]


def parse_seeds(value: Any, where: str) -> Optional[List[int]]:
    """The seeds of a `seeds:` field: N means 0..N-1, a list is taken as written; None
    (`seeds: null`, e.g. a stage that runs once in a study with seeds) means no seeds."""
    if value is None:
        return None
    ok_int = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    ok_list = (isinstance(value, list) and bool(value) and len(set(value)) == len(value)
               and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value))
    if not (ok_int or ok_list):
        raise StudyError(f"{where}: expected {SEEDS_VALID}, got {value!r}")
    return list(range(value)) if ok_int else list(value)


def seed_name(name: str, seed: int) -> str:
    """A seed's copy of run `name`: named like a `run.seed` grid axis value (`seed-1`)."""
    return f"{name}_seed-{seed}"


def substitute(value: Any, context: Dict[str, Optional[str]], where: str = "value") -> Tuple[Any, List[str]]:
    """(value with placeholders replaced, keys of the runs it names). `context` maps
    `study_dir`, `run_dir` and `run:NAME` (each earlier run, by `stage/run` and,
    when unambiguous, by `run`) to paths, `key:run:NAME` to the run's key, and
    `why:run:NAME` (optional) to why a NAME mapped to None cannot be used here;
    lists are substituted item by item."""
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
        resolved = context[token]
        if resolved is None:
            why = context.get(f"why:{token}")  # a seeded run's name that does not resolve here
            raise StudyError(f"{where}: {{{token}}} {why}" if why else
                             f"{where}: {{{token}}} is ambiguous; write {{run:STAGE/RUN}}")
        if token.startswith("run:"):
            deps.append(str(context[f"key:{token}"]))
        return resolved

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
    data = read_yaml(path, "study", StudyError)  # refuses an empty file and duplicate keys
    _check_keys(data, ("name", "base", "set", "seeds", "stages"), str(path))
    for key in ("name", "base", "stages"):
        if key not in data:
            raise StudyError(f"{path}: missing '{key}'")
    if safe_name(data["name"]) != str(data["name"]):
        raise StudyError(f"{path}: name {data['name']!r} must use only letters, digits and . _ + -")
    if not isinstance(data["stages"], list) or not data["stages"]:
        raise StudyError(f"{path}: stages: expected a non-empty list")
    parse_seeds(data.get("seeds"), f"{path}: seeds")
    return data


Point = Tuple[str, str, Dict[str, str], Dict[str, Any]]  # (run name, group, grid values, overrides)
# What a `{run:NAME}` token names: seed (None: a run without seeds) -> (run dir, run key);
# None when two different runs would take the name.
Ref = Optional[Dict[Optional[int], Tuple[str, str]]]


def _stage_points(stage: dict, where: str) -> List[Point]:
    """(run name, group, grid values, overrides) of a stage's runs, before seeds and
    substitution. A `run.seed` grid axis is left out of the group name, so its runs are
    aggregated like the copies `seeds:` makes."""
    if ("runs" in stage) == ("grid" in stage):
        raise StudyError(f"{where}: give either 'runs' or 'grid'")
    if "grid" in stage:
        points: List[Point] = []
        for parts, values, overrides in _grid_points(stage["grid"], f"{where}.grid"):
            group = "_".join(p for axis, p in parts if axis != SEED_AXIS) or "all-seeds"
            points.append(("_".join(p for _, p in parts), group, values, overrides))
        return points
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
        points.append((name, name, {}, _sets(run, f"{where}.runs[{i}]")))
    return points


def _seed_copies(point: Point, seeds: Optional[List[int]]) -> List[Tuple[Point, Optional[int]]]:
    """The runs of one point with their seeds: the point itself (its seed that of a
    `run.seed` grid axis, if any), or one copy per seed, which sets run.seed and adds the
    seed to the name and, as the axis `run.seed`, to the grid values."""
    name, group, values, overrides = point
    if seeds is None:
        seed = overrides.get(SEED_AXIS) if SEED_AXIS in values else None
        return [(point, seed if isinstance(seed, int) and not isinstance(seed, bool) else None)]
    return [((seed_name(name, s), name, {**values, SEED_AXIS: str(s)}, {**overrides, SEED_AXIS: s}), s)
            for s in seeds]


def _refer(refs: Dict[str, Ref], stage: str, name: str, seed: Optional[int], run_dir: str, key: str) -> None:
    """Lets `{run:STAGE/NAME}` and `{run:NAME}` name a run (seed None), or name a run with
    seeds by its name without the seed (then each seed is a separate entry)."""
    for token in (f"run:{stage}/{name}", f"run:{name}"):
        ref = refs.get(token, {})
        if ref is None or seed is None and ref or None in ref or seed in ref:
            refs[token] = None  # two different runs would take this name
        else:
            ref[seed] = (run_dir, key)
            refs[token] = ref


def _references(earlier: Dict[str, Ref], seed: Optional[int]) -> Dict[str, Optional[str]]:
    """substitute's context entries for the earlier runs, seen from a run with `seed`. A run
    without seeds is the same for every seed; a run with seeds, named without its seed, is
    its copy with the same seed (the offline runs with seed 1 read the dataset recorded
    with seed 1), and a run without a seed must name one copy."""
    context: Dict[str, Optional[str]] = {}
    for token, ref in earlier.items():
        hit = None if ref is None else ref.get(None, ref.get(seed) if seed is not None else None)
        if hit is not None:
            context[token], context[f"key:{token}"] = hit
            continue
        context[token] = None
        if ref is not None:  # a run with seeds that has no copy for this run
            seeds = ", ".join(str(s) for s in sorted(s for s in ref if s is not None))
            one = "{" + seed_name(token, min(s for s in ref if s is not None)) + "}"
            context[f"why:{token}"] = (
                f"names a run with seeds {seeds} (each seed reads the copy with its own seed); "
                + (f"this run's seed {seed} is not one of them: give both stages the same seeds, "
                   f"or name one copy, e.g. {one}" if seed is not None else
                   f"this run has no seed, so name one copy, e.g. {one}"))
    return context


def plan_study(study: dict, study_path: Path, study_dir: Path, validate: bool = True) -> List[RunSpec]:
    """Every run of the study, in order (a stage's points in grid order, each point's seeds
    in a row), with placeholders resolved and (when `validate`) its config built and
    checked, as `eosrl train` will build it."""
    study_dir = Path(study_dir).resolve()
    where = str(study_path)
    common = _sets(study, where)
    study_seeds = parse_seeds(study.get("seeds"), f"{where}: seeds")
    specs: List[RunSpec] = []
    earlier: Dict[str, Ref] = {}  # `run:NAME` tokens of the runs of earlier stages
    stage_names = set()
    for s, stage in enumerate(study["stages"]):
        swhere = f"{where}: stages[{s}]"
        _check_keys(stage, ("name", "base", "set", "seeds", "runs", "grid"), swhere)
        stage_name = str(stage.get("name", ""))
        if not stage_name or safe_name(stage_name) != stage_name or stage_name in stage_names:
            raise StudyError(f"{swhere}.name: {stage_name!r} must be a new name of letters, digits and . _ + -")
        stage_names.add(stage_name)
        base = resolve_base(stage.get("base", study["base"]), study_path, swhere)
        stage_sets = _sets(stage, swhere)
        seeds = parse_seeds(stage["seeds"], f"{swhere}.seeds") if "seeds" in stage else study_seeds
        this_stage: Dict[str, Ref] = {}
        names = set()
        for point in _stage_points(stage, swhere):
            if seeds is not None and SEED_AXIS in {**common, **stage_sets, **point[3]}:
                raise StudyError(f"{swhere}: run {point[0]} gets its seed from both 'seeds' and "
                                 f"'{SEED_AXIS}'; keep one ('seeds' runs every run once per seed)")
            for (name, group, values, overrides), seed in _seed_copies(point, seeds):
                if name in names:
                    raise StudyError(f"{swhere}: two runs named {name!r}")
                names.add(name)
                run_dir = study_dir / stage_name / name
                context: Dict[str, Optional[str]] = {"study_dir": str(study_dir), "run_dir": str(run_dir),
                                                     **_references(earlier, seed)}
                merged = {**common, **stage_sets, **overrides}
                resolved, deps = {}, []
                for key, value in merged.items():
                    resolved[key], used = substitute(value, context, f"{swhere} run {name}: {key}")
                    deps += [d for d in used if d not in deps]
                spec = RunSpec(stage_name, name, base, run_dir, values, resolved, deps, group=group, seed=seed)
                if validate:
                    try:
                        spec.config = load_config(base, spec.set_args())
                    except ConfigError as e:
                        raise StudyError(f"{where}: run {spec.key}: {e}") from None
                specs.append(spec)
                _refer(this_stage, stage_name, name, None, str(run_dir), spec.key)
                if seeds is not None:
                    _refer(this_stage, stage_name, group, seed, str(run_dir), spec.key)
        # Runs of this stage become referable from the next stage on; a name an earlier
        # stage has too (the same run name in two stages) must be written as stage/run.
        for token, ref in this_stage.items():
            earlier[token] = None if token in earlier else ref
    return specs


# ----------------------------------------------------------------------------
# Reading run directories.


def read_records(run_dir: Path) -> List[Dict[str, Any]]:
    """The run's history: records a resume superseded are left out."""
    path = RunDir(run_dir).metrics
    return without_superseded(read_metrics(path)) if path.is_file() else []


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
