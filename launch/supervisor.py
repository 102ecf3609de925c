"""Starting and stopping `eosrl` subprocesses: the one supervisor behind
`eosrl launch` (a process per role) and `eosrl study` (a process per run).

Each child runs `python -m eosrl.launch.cli ARGS` in a session of its own, so
a terminal's Ctrl-C reaches only the parent, which then stops its children in
the order that keeps their checkpoints good; the child's output goes to its
log file; and the child ends itself if the parent is killed (launch/lifeline.py).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from eosrl.launch.lifeline import child_environment


class Child:
    """One `eosrl` subcommand as a child process, its output appended to `log`;
    `cwd`: its working directory (default: the parent's)."""

    def __init__(self, name: str, args: Sequence[str], log: Path, cwd: Optional[Path] = None):
        self.name, self.args, self.log = name, list(args), Path(log)
        self.cwd = cwd
        self.proc: Optional[subprocess.Popen] = None

    @property
    def command(self) -> List[str]:
        return [sys.executable, "-m", "eosrl.launch.cli", *self.args]

    def start(self) -> None:
        env = child_environment(dict(os.environ, PYTHONUNBUFFERED="1"))
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.cwd, env=env,
                                         start_new_session=True)

    @property
    def pid(self) -> Optional[int]:
        return None if self.proc is None else self.proc.pid

    def poll(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: Optional[float] = None) -> bool:
        """True once the child has exited; False if it still runs after `timeout` seconds."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=None if timeout is None else max(0.0, timeout))
            return True
        except subprocess.TimeoutExpired:
            return False


def stop(children: Sequence[Child], deadline_s: float) -> None:
    """SIGTERM (each child's clean way out), wait until the deadline, then SIGKILL."""
    for child in children:
        child.signal(signal.SIGTERM)
    end = time.time() + deadline_s
    for child in children:
        child.wait(end - time.time())
    for child in children:
        if child.poll() is None:
            child.signal(signal.SIGKILL)
            child.wait(2.0)


def write_pids(path: Path, children: Sequence[Any]) -> None:
    """Which process is which child (for operators and tests), replaced atomically;
    `children`: anything with a `name` and a `pid` (a Child, a Ray role)."""
    pids: Dict[str, int] = {"launcher": os.getpid()}
    pids.update({c.name: c.pid for c in children if c.pid is not None})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(pids))
    os.replace(tmp, path)
