"""`eosrl launch` with the local launcher: every role as its own OS process.

The orchestration is launch/launcher.py's; this module only places each role as an
`eosrl ROLE ...` child of launch/supervisor.py (a session of its own, logs in
RUN_DIR/logs/, ended when the launcher dies: launch/lifeline.py), polls its exit
code and stops it with SIGTERM, then SIGKILL after a grace period.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from eosrl.launch.config import Config
from eosrl.launch.launcher import launch
from eosrl.launch.rundir import RunDir
from eosrl.launch.supervisor import Child, stop, write_pids

# The role functions' arguments (launch/roles.py) as the subcommands' flags (launch/cli.py).
_FLAGS = {"address": "--replay", "port": "--port", "actor_id": "--id", "num_actors": "--num-actors",
          "steps": "--steps", "start_step": "--start-step", "run_dir": "--run-dir"}
_COMMANDS = {"replay": "replay-server"}


class LocalPlacement:
    """Roles as subprocesses of this machine."""
    launcher = "local"

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir

    def start(self, name: str, role: str, **kwargs: Any) -> Child:
        args: List[str] = [_COMMANDS.get(role, role), str(self.run_dir.config)]
        for key, value in kwargs.items():
            args += [_FLAGS[key], str(value)]
        child = Child(name, args, self.run_dir.logs / f"{name}.log")
        child.start()
        return child

    def host(self, replay: Child) -> str:
        return "localhost"

    def server_note(self, host: str, port: int) -> str:
        return f"port {port} of every network interface"

    def stop(self, handles: Sequence[Child], grace_s: float) -> None:
        stop(handles, grace_s)

    def record(self, handles: Sequence[Child]) -> None:
        write_pids(self.run_dir.logs / "pids.json", handles)

    def log(self, name: str) -> str:
        return str(self.run_dir.logs / f"{name}.log")


def launch_local(config: Config, run_path: Path, num_actors: int, resume: bool = False,
                 progress: bool = True, port: Optional[int] = None) -> Dict:
    return launch(LocalPlacement(RunDir(run_path)), config, run_path, num_actors, resume, progress, port)
