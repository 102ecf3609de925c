"""The end of a run, the same for `eosrl train` and both launchers: one summary,
written as the `finished` event of metrics.jsonl (studies read it) and printed
for the person who started the run.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Dict, Optional

from eosrl.agents import checkpoint
from eosrl.launch.rundir import MetricsWriter, RunDir, read_metrics


def finish_run(run_dir: RunDir, metrics: MetricsWriter, status: str, start_time: float, *,
               env_steps: Optional[int] = None, learner_updates: Optional[int] = None,
               final_eval: Optional[float] = None, message: str = "", **extra: Any) -> Dict[str, Any]:
    """The summary of a run that ended with `status`; counts not given come from its newest
    checkpoint. Only a completed run has a final evaluation; the last one before a run
    stopped is reported as such."""
    latest = checkpoint.latest(run_dir.checkpoints)
    meta = checkpoint.read_meta(latest) if latest else {}
    evals = list(read_metrics(run_dir.metrics, "eval")) if run_dir.metrics.exists() else []
    if status == "diverged" and not message:
        message = divergence_message(run_dir)
    summary = {
        "status": status,
        "message": message,
        "run_dir": str(run_dir.path),
        "env_steps": int(meta.get("env_steps", 0)) if env_steps is None else env_steps,
        "learner_updates": int(meta.get("learner_step", 0)) if learner_updates is None else learner_updates,
        "final_eval_return": final_eval if status == "completed" else None,
        "last_eval_return": evals[-1]["return_mean"] if evals else None,
        "checkpoint": str(latest) if latest else None,
        "wall_seconds": round(time.time() - start_time, 1),
        **extra,
    }
    metrics.write("event", summary["learner_updates"], event="finished", **summary)
    return summary


def last_checkpoint_note(run_dir: RunDir) -> str:
    latest = checkpoint.latest(run_dir.checkpoints)
    if latest is None:
        return "it wrote no checkpoint, so the run cannot be resumed; start it again"
    step = checkpoint.read_meta(latest).get("learner_step")
    return f"the last checkpoint (update {step}) is intact: eosrl launch --resume {run_dir.path}"


def divergence_message(run_dir: RunDir) -> str:
    events = [r for r in read_metrics(run_dir.metrics, "event") if r.get("event") == "divergence"]
    where = f" at update {events[-1]['step']}" if events else ""
    latest = checkpoint.latest(run_dir.checkpoints)
    kept = (f"the last good checkpoint is {latest} (update {checkpoint.read_meta(latest).get('learner_step')})"
            if latest else "no checkpoint was written before it")
    return f"the learner diverged: the TD loss became non-finite{where}; {kept}"


def print_summary(summary: Dict[str, Any]) -> None:
    print()
    print(f"Run {summary['status']}: {summary['env_steps']} env steps, "
          f"{summary['learner_updates']} learner updates in {summary['wall_seconds']} s")
    if summary.get("final_eval_return") is not None:
        random = summary.get("random_policy_return")
        against = f"  (random policy: {random:.2f}, the same episodes)" if random is not None else ""
        print(f"  final evaluation return: {summary['final_eval_return']:.2f}{against}")
    elif summary.get("last_eval_return") is not None:
        print(f"  last evaluation return (before the run stopped): {summary['last_eval_return']:.2f}")
    print(f"  run directory:  {summary['run_dir']}  (metrics.jsonl, tb/, checkpoints/)")
    if summary.get("checkpoint"):
        print(f"  last checkpoint: {summary['checkpoint']}")
    print(f"  next: eosrl evaluate {summary['run_dir']}   |   eosrl plot {summary['run_dir']}")
    if summary.get("message"):
        print(f"eosrl: {summary['message']}", file=sys.stderr)
