"""Helpers for tests that start `eosrl` processes and kill them: the command line,
waiting, the run's pids, liveness, its events, and clean-up after a failed assertion."""
import json
import os
import signal
import sys
import time
from pathlib import Path

from eosrl.launch.rundir import RunDir, read_metrics


def eosrl(*args):
    return [sys.executable, "-m", "eosrl.launch.cli", *args]


def wait_for(predicate, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def pids(run_dir):
    path = RunDir(run_dir).logs / "pids.json"
    return json.loads(path.read_text()) if path.exists() else {}


def alive(pid):
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie (exited, not yet reaped) counts as gone
    except (ProcessLookupError, FileNotFoundError):
        return False


def events(run_dir, name):
    path = RunDir(run_dir).metrics
    if not path.exists():
        return []
    return [r for r in read_metrics(path, "event") if r.get("event") == name]


def kill_launch(launcher, run_dir):
    """After a failed assertion: the launcher and every role it started, so nothing
    outlives the test and slows the rest of the suite (roles run in sessions of their own)."""
    if launcher.poll() is None:
        launcher.kill()
        launcher.wait(10)
    for pid in pids(run_dir).values():
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def has_checkpoint(run_dir):
    from eosrl.agents import checkpoint
    return checkpoint.latest(Path(run_dir) / "checkpoints") is not None
