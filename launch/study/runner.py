"""Running a study: each run an `eosrl train` child of launch/supervisor.py, K of a
stage at once, finished runs skipped and unfinished ones resumed from their checkpoint;
then the report. Also `eosrl study`'s command line. See docs/study.md.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from eosrl.agents import checkpoint
from eosrl.agents.config import ConfigError, load_config
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


class Runner:
    """Runs specs as `eosrl train` subprocesses, K at once; stops them on request."""

    def __init__(self, parallel: int = 1, echo=print):
        self.parallel = max(1, int(parallel))
        self.echo = echo
        self.results: Dict[str, RunResult] = {}
        self.stopping = threading.Event()
        self._children: Dict[str, Child] = {}  # spec key -> its run in flight
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
            children = list(self._children.values())
        for child in children:
            child.signal(signal.SIGTERM)  # a no-op for one that has ended

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
        start = time.time()
        child = run_child(spec, resume)
        with open(child.log, "a" if resume else "w") as log:
            if resume:
                log.write(f"\n--- eosrl study: resuming from {checkpoint.latest(spec.run_dir / 'checkpoints')}\n")
        # Its own session, so a Ctrl-C meant for the study reaches runs only through stop();
        # and it ends if the study is killed (launch/lifeline.py).
        child.start()
        with self._lock:
            self._children[spec.key] = child
            verb = "resumed" if resume else "started"
            self.echo(f"  {verb} {spec.key}  (log: {spec.run_dir / 'train.log'})")
        if self.stopping.is_set():  # stop() ran between the check above and start()
            child.signal(signal.SIGTERM)
        try:
            child.wait()
            returncode = child.poll()
        finally:
            with self._lock:
                self._children.pop(spec.key, None)
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
    interrupted = False
    try:
        with stop_on_signals():
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
        echo("    cmd  python " + " ".join(shlex.quote(c) for c in run_child(spec).command[1:]))


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
                    "The study file format, run names and resuming: docs/study.md.")
    p.add_argument("study", metavar="STUDY_YAML", help="study file, e.g. configs/studies/eos_regimes_minatar.yaml")
    p.add_argument("--parallel", type=int, default=1, metavar="K",
                   help="runs of a stage at once (default 1; each run uses several cores)")
    p.add_argument("--out", metavar="DIR", help="study directory (default runs/<study name>)")
    p.add_argument("--dry-run", action="store_true",
                   help="check every run's config and print the plan and commands; run nothing")
    p.set_defaults(func=cmd_study)
    return p
