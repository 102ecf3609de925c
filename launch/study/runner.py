"""Running a study: each run an `eosrl train` child of launch/supervisor.py, K of a
stage at once, finished runs skipped and unfinished ones resumed from their checkpoint;
then the report. Also `eosrl study`'s command line. See docs/study.md.
"""
from __future__ import annotations

import argparse
import fnmatch
import shlex
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from eosrl.agents import checkpoint
from eosrl.launch.config import ConfigError, load_config, save_config
from eosrl.launch.lifeline import stop_on_signals
from eosrl.launch.rundir import RunDir
from eosrl.launch.study.report import report_rows, status_counts, write_report
from eosrl.launch.study.spec import (FINISHED, ROOT, RunResult, RunSpec, StudyError, finished_status,
                                     load_study, plan_study, summarize_run)
from eosrl.launch.supervisor import Child


def run_child(spec: RunSpec, resume: bool = False) -> Child:
    """The run as a supervisor child, not yet started: `eosrl train ...` in ROOT (study
    runs have always run there), its output appended to RUN_DIR/train.log."""
    return Child(spec.key, spec.train_args(resume), spec.run_dir / "train.log", cwd=ROOT)


def cell_child(specs: Sequence[RunSpec]) -> Child:
    """A `seed_cells` job's unfinished runs as one supervisor child, `eosrl train
    --seed-runs DIR ...` (each DIR's config.yaml written first), its output in the first
    run's train.log."""
    first = specs[0]
    return Child(first.key, ["train", "--seed-runs", *(str(s.run_dir) for s in specs), "--no-progress"],
                 first.run_dir / "train.log", cwd=ROOT)


class Runner:
    """Runs specs as `eosrl train` subprocesses, K at once; stops them on request."""

    def __init__(self, parallel: int = 1, echo=print, vmap_seeds: bool = False):
        self.parallel = max(1, int(parallel))
        self.echo = echo
        self.vmap_seeds = vmap_seeds  # an offline cell's seeds (and lrs) as one `eosrl train --seed-runs` (seed_cells)
        self.results: Dict[str, RunResult] = {}
        self.stopping = threading.Event()
        self._children: Dict[str, Child] = {}  # spec key -> its run in flight
        self._lock = threading.Lock()
        self.done = 0
        self.total = 0
        self.run_dirs: Dict[str, Path] = {}  # every planned run's, selected or not
        self.started = time.time()

    def _report(self, result: RunResult) -> None:
        with self._lock:
            self.done += 1
            self.results[result.spec.key] = result
            elapsed = (time.time() - self.started) / 60
            self.echo(f"[{self.done}/{self.total}] {result.spec.key}: {describe(result)}  "
                      f"({elapsed:.1f} min elapsed)")

    def _status(self, key: str) -> Optional[str]:
        """How run `key` ended: in this invocation, or (a run `--only` left out) on disk."""
        if key in self.results:
            return self.results[key].status
        return finished_status(self.run_dirs[key]) if key in self.run_dirs else None

    def run_stage(self, specs: List[RunSpec]) -> None:
        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            futures = [pool.submit(self._execute_job, job) for job in (seed_cells(specs) if self.vmap_seeds else specs)]
            try:
                for future in as_completed(futures):
                    for result in future.result():
                        self._report(result)
            except BaseException:
                self.stop()
                pool.shutdown(wait=True, cancel_futures=True)
                for future in futures:  # keep what the stopped runs said, for the report
                    if future.done() and not future.cancelled() and future.exception() is None:
                        for result in future.result():
                            self.results.setdefault(result.spec.key, result)
                raise

    def stop(self) -> None:
        """Ends what runs now the clean way (train treats SIGTERM as Ctrl-C); starts nothing more."""
        self.stopping.set()
        with self._lock:
            children = list(self._children.values())
        for child in children:
            child.signal(signal.SIGTERM)  # a no-op for one that has ended

    def execute(self, spec: RunSpec) -> RunResult:
        status = finished_status(spec.run_dir)
        if status in FINISHED:
            return RunResult(spec, status, skipped=True)
        blocked = [d for d in spec.deps if self._status(d) not in FINISHED]
        if blocked:
            return RunResult(spec, "blocked", note=f"needs {', '.join(blocked)}, which did not finish")
        if self.stopping.is_set():
            return RunResult(spec, "not run", note="the study was stopped")
        resume = resumable(spec)
        if not resume:
            clear_unfinished(spec.run_dir)
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        child = run_child(spec, resume)
        with open(child.log, "a" if resume else "w") as log:
            if resume:
                log.write(f"\n--- eosrl study: resuming from {checkpoint.latest(spec.run_dir / 'checkpoints')}\n")
        verb = "resumed" if resume else "started"
        returncode, seconds = self._supervise(spec.key, child, f"  {verb} {spec.key}  (log: {spec.run_dir / 'train.log'})")
        return RunResult(spec, self._ended(spec), resumed=resume, returncode=returncode, seconds=seconds)

    def _supervise(self, key: str, child: Child, announce: str) -> Tuple[Optional[int], float]:
        """Starts `child`, waits for it and returns (exit code, seconds). Its own session, so
        a Ctrl-C meant for the study reaches runs only through stop(); and it ends if the
        study is killed (launch/lifeline.py)."""
        start = time.time()
        child.start()
        with self._lock:
            self._children[key] = child
            self.echo(announce)
        if self.stopping.is_set():  # stop() ran between the caller's check and start()
            child.signal(signal.SIGTERM)
        try:
            child.wait()
            returncode = child.poll()
        finally:
            with self._lock:
                self._children.pop(key, None)
        return returncode, time.time() - start

    def _ended(self, spec: RunSpec) -> str:
        """How a run that this study ran ended."""
        status = finished_status(spec.run_dir)
        if status not in FINISHED + ("interrupted",):
            # Stopped by the study (a SIGTERM outside train's loop ends it without a record) or failed.
            status = "interrupted" if self.stopping.is_set() else "failed"
        return status

    def _execute_job(self, job: RunSpec | List[RunSpec]) -> List[RunResult]:
        return self.execute_cell(job) if isinstance(job, list) else [self.execute(job)]

    def execute_cell(self, specs: List[RunSpec]) -> List[RunResult]:
        """The offline runs of one `seed_cells` job (a grid cell's seeds, and step sizes) as
        one child, `eosrl train --seed-runs DIR ...` (one vmapped program,
        launch/train_seeds.py): finished runs are skipped, blocked ones not run, unfinished
        ones with a checkpoint of their config resume and the others start over, as
        `execute` treats a lone run. Its log is the first run's train.log; the others' name it."""
        results: List[RunResult] = []
        todo: List[RunSpec] = []
        for spec in specs:
            status = finished_status(spec.run_dir)
            blocked = [d for d in spec.deps if self._status(d) not in FINISHED]
            if status in FINISHED:
                results.append(RunResult(spec, status, skipped=True))
            elif blocked:
                results.append(RunResult(spec, "blocked", note=f"needs {', '.join(blocked)}, which did not finish"))
            elif self.stopping.is_set():
                results.append(RunResult(spec, "not run", note="the study was stopped"))
            else:
                todo.append(spec)
        if len(todo) < 2:
            return results + [self.execute(spec) for spec in todo]
        resumed = {spec.key: resumable(spec) for spec in todo}
        for spec in todo:
            if not resumed[spec.key]:
                clear_unfinished(spec.run_dir)
                spec.run_dir.mkdir(parents=True, exist_ok=True)
                assert spec.config is not None  # seed_cells takes only runs with one
                save_config(spec.config, spec.run_dir / "config.yaml")
        first = todo[0]
        child = cell_child(todo)
        for spec in todo:
            with open(spec.run_dir / "train.log", "a" if resumed[spec.key] else "w") as log:
                if spec is not first:
                    log.write(f"--- eosrl study: runs with {', '.join(s.key for s in todo if s is not spec)} as one "
                              f"vmapped program; its output: {first.run_dir / 'train.log'}\n")
                elif any(resumed.values()):
                    log.write(f"\n--- eosrl study: {', '.join(s.key for s in todo)} together; "
                              f"resuming {', '.join(s.key for s in todo if resumed[s.key])}\n")
        returncode, seconds = self._supervise(
            first.key, child, f"  started {', '.join(s.key for s in todo)} as one program  (log: {child.log})")
        for spec in todo:
            results.append(RunResult(spec, self._ended(spec), resumed=resumed[spec.key], returncode=returncode,
                                     seconds=seconds))
        return results


def seed_cells(specs: Sequence[RunSpec]) -> List[RunSpec | List[RunSpec]]:
    """The stage's runs as jobs for `--vmap-seeds`: the offline runs whose configs differ
    only in run.seed, regime.dataset and agent.optimizer.lr (a grid cell's seeds, and the
    cells of a grid over lr; `train_seeds.shared_part`) as one list, each other run alone;
    in the order of their first run."""
    from eosrl.launch.train_seeds import check_together, shared_part
    cells: List[List[RunSpec]] = []
    shared: List[Any] = []  # each cell's shared_part (configs are not hashable)
    for spec in specs:
        offline = spec.config is not None and spec.config.regime.mode == "offline"
        part = shared_part(spec.config) if offline else None
        if offline and part in shared:
            cells[shared.index(part)].append(spec)
        else:
            cells.append([spec])
            shared.append(part)
    jobs: List[RunSpec | List[RunSpec]] = []
    for cell in cells:
        together = len(cell) > 1
        try:
            if together:
                check_together({s.key: s.config for s in cell})
        except ValueError:
            together = False
        jobs += [cell] if together else cell
    return jobs


def resumable(spec: RunSpec) -> bool:
    """Whether an unfinished attempt left a checkpoint of exactly this run's config
    (a study file edited since then starts the run over)."""
    run_dir = spec.run_dir
    if spec.config is None or checkpoint.latest(RunDir(run_dir).checkpoints) is None:
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
# Entry points.


def select(specs: Sequence[RunSpec], only: Sequence[str]) -> List[RunSpec]:
    """The runs whose key (`STAGE/RUN`) matches one of the shell patterns `only` (all of them
    when `only` is empty): how a long study runs in parts, e.g. `--only '*_seed-0'`."""
    if not only:
        return list(specs)
    chosen = [s for s in specs if any(fnmatch.fnmatchcase(s.key, pattern) for pattern in only)]
    if not chosen:
        raise StudyError(f"--only: {', '.join(only)} matches none of the study's runs "
                         f"(keys are STAGE/RUN, e.g. {specs[0].key})")
    return chosen


def run_study(study_path: str | Path, parallel: int = 1, out: Optional[str | Path] = None,
              dry_run: bool = False, echo=print, only: Sequence[str] = (), vmap_seeds: bool = False) -> Dict[str, Any]:
    """Runs (or resumes) the study and writes its report. Returns {study_dir, report,
    rows, counts}; with `dry_run`, prints the plan and runs nothing (report None). With
    `only` (shell patterns of run keys) just the matching runs run; the report still
    covers every run, those not yet run as "not run"."""
    study_path = Path(study_path)
    study = load_study(study_path)
    study_dir = Path(out) if out else Path("runs") / study["name"]
    all_specs = plan_study(study, study_path, study_dir)
    specs = select(all_specs, only)
    study_dir = study_dir.resolve()
    if dry_run:
        print_plan(specs, echo, vmap_seeds)
        return {"study_dir": str(study_dir), "report": None, "rows": [], "counts": {}}
    study_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(study_path, study_dir / "study.yaml")  # what ran, next to its results
    runner = Runner(parallel, echo, vmap_seeds=vmap_seeds)
    runner.total = len(specs)
    runner.run_dirs = {s.key: s.run_dir for s in all_specs}
    part = f" ({len(specs)} of {len(all_specs)} selected by --only)" if only else ""
    echo(f"Study {study['name']}: {len(specs)} runs in {len(study['stages'])} stages{part}, "
         f"{runner.parallel} at a time -> {study_dir}")
    interrupted = False
    try:
        with stop_on_signals():
            for stage in dict.fromkeys(s.stage for s in specs):
                runner.run_stage([s for s in specs if s.stage == stage])
    except KeyboardInterrupt:
        interrupted = True
        echo("Interrupted: running runs were stopped; run the study again to continue.")
    report = write_report(study, study_path, study_dir, all_specs, runner.results)
    rows = report_rows(all_specs, runner.results)
    counts = status_counts(rows)
    echo(f"Report: {report}  ({', '.join(f'{n} {s}' for s, n in counts.items())})")
    return {"study_dir": str(study_dir), "report": str(report), "rows": rows, "counts": counts,
            "interrupted": interrupted}


def print_plan(specs: Sequence[RunSpec], echo=print, vmap_seeds: bool = False) -> None:
    """Each run's status, directory and command; with `vmap_seeds`, the runs that would
    share a program (`seed_cells`) are listed together under its one command."""
    def command(child: Child) -> str:
        return "python " + " ".join(shlex.quote(c) for c in child.command[1:])

    i = 0
    for stage in dict.fromkeys(s.stage for s in specs):
        staged = [s for s in specs if s.stage == stage]
        for job in (seed_cells(staged) if vmap_seeds else staged):
            cell = job if isinstance(job, list) else [job]
            todo = []
            for spec in cell:
                i += 1
                status = finished_status(spec.run_dir)
                state = f"skip: already finished ({status})" if status in FINISHED else "to run"
                todo += [] if status in FINISHED else [spec]
                echo(f"[{i}/{len(specs)}] {spec.key}  ({state})")
                echo(f"    dir  {spec.run_dir}")
                if not isinstance(job, list):
                    echo(f"    cmd  {command(run_child(spec))}")
            if isinstance(job, list) and len(todo) > 1:
                echo(f"    one program for {', '.join(s.key for s in todo)} (the study writes each "
                     f"run directory's config.yaml first):")
                echo(f"    cmd  {command(cell_child(todo))}")
            elif isinstance(job, list) and todo:
                echo(f"    cmd  {command(run_child(todo[0]))}")


def cmd_study(args) -> int:
    if args.parallel < 1:
        raise StudyError(f"--parallel: must be >= 1, got {args.parallel}")
    result = run_study(args.study, parallel=args.parallel, out=args.out, dry_run=args.dry_run,
                       only=args.only or (), vmap_seeds=args.vmap_seeds)
    if result.get("interrupted"):
        return 130
    # With --only, the runs left out are "not run" by design, not a failure.
    bad = sum(n for s, n in result["counts"].items() if s not in FINISHED + (("not run",) if args.only else ()))
    return 1 if bad else 0


def add_study_parser(sub) -> argparse.ArgumentParser:
    """Registers `eosrl study` on the subparsers of launch.cli."""
    p = sub.add_parser(
        "study", help="run a study: stages of runs (grids of config values) and a report",
        description="Run the runs of STUDY_YAML stage by stage as `eosrl train` subprocesses "
                    "(a finished run is skipped, so a study resumes), then write "
                    "STUDY_DIR/report.md with a table of all runs and figures. "
                    "The study file format, run names and resuming: docs/study.md.")
    p.add_argument("study", metavar="STUDY_YAML", help="study file, e.g. configs/studies/eos_regimes_minatar.yaml")
    p.add_argument("--parallel", type=int, default=1, metavar="K",
                   help="runs of a stage at once (default 1; each run uses several cores)")
    p.add_argument("--out", metavar="DIR", help="study directory (default runs/<study name>)")
    p.add_argument("--only", action="append", metavar="PATTERN",
                   help="run only the runs whose key STAGE/RUN matches this shell pattern "
                        "(repeatable), e.g. --only 'headline/*_seed-0': a long study in parts")
    p.add_argument("--vmap-seeds", action="store_true",
                   help="run the seeds of each offline grid cell, and the cells of a grid over "
                        "agent.optimizer.lr, as one vmapped program (one `eosrl train --seed-runs` child, each "
                        "run's directory as if it ran alone): docs/study.md")
    p.add_argument("--dry-run", action="store_true",
                   help="check every run's config and print the plan and commands; run nothing")
    p.set_defaults(func=cmd_study)
    return p
