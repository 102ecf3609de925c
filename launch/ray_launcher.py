"""`eosrl launch --launcher ray`: the same roles placed as Ray actors on a Ray
cluster (`ray.init(address=...)`) or on a local Ray instance.

The orchestration (restarts, the prober's drain, the final evaluation, the summary)
is launch/launcher.py's, as for the local launcher. Each Ray actor calls the role
function `eosrl launch` would run as a process (launch/roles.py, launch/prober.py);
the replay server's node IP is the address the other roles are given; the learner
may ask for GPUs. Ray is an optional extra: `pip install -e .[ray]`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from eosrl.launch.config import Config, to_dict
from eosrl.launch.launcher import launch
from eosrl.launch.rundir import RunDir
from eosrl.launch.supervisor import write_pids

EXIT_LOST = -1  # the exit code given to a role whose Ray actor died (Ray does not report one)


def _role_actor(ray):
    @ray.remote(max_restarts=0)
    class Role:
        """Runs one role (replay server, actor, learner, evaluator, prober) in a Ray worker."""

        def where(self) -> tuple:
            """(node IP, pid)."""
            return ray.util.get_node_ip_address(), os.getpid()

        def run(self, role: str, config_dict: dict, **kwargs) -> int:
            from eosrl.launch.config import from_dict
            from eosrl.launch import prober, roles
            config = from_dict(config_dict)
            if role == "replay":
                roles.run_replay_server(config, kwargs["port"], kwargs.get("run_dir"))
                return 0
            runs: Dict[str, Callable[..., int]] = {"actor": roles.run_actor, "learner": roles.run_learner,
                                                   "evaluator": roles.run_evaluator, "prober": prober.run_prober}
            return runs[role](config, **kwargs)

    return Role


class _RayRole:
    """One role's Ray actor and the reference to its `run` call."""

    def __init__(self, ray, name: str, actor, role: str, config_dict: dict, kwargs: Dict[str, Any]):
        self.ray, self.name, self.actor = ray, name, actor
        # Asked before `run`: an actor answers one call at a time, and `run` returns only
        # when the role ends.
        self._where = actor.where.remote()
        self.ref = actor.run.remote(role, config_dict, **kwargs)
        self.code: Optional[int] = None

    @property
    def node_ip(self) -> str:
        return self.ray.get(self._where)[0]

    @property
    def pid(self) -> Optional[int]:
        """On the role's node; None for a role whose worker died before it answered."""
        try:
            return self.ray.get(self._where)[1]
        except self.ray.exceptions.RayError:
            return None

    def poll(self) -> Optional[int]:
        if self.code is None and self.ray.wait([self.ref], timeout=0)[0]:
            try:
                self.code = self.ray.get(self.ref)
            except self.ray.exceptions.RayError:  # the actor died (killed, out of memory, its node lost)
                self.code = EXIT_LOST
        return self.code


class RayPlacement:
    """Roles as Ray actors of one CPU each (the learner also `learner_gpus`)."""
    launcher = "ray"

    def __init__(self, ray, config: Config, run_dir: RunDir, learner_gpus: float):
        self.ray, self.run_dir, self.learner_gpus = ray, run_dir, learner_gpus
        self.Role = _role_actor(ray)
        self.config_dict = to_dict(config)

    def start(self, name: str, role: str, **kwargs: Any) -> _RayRole:
        actor = self.Role.options(num_cpus=1, num_gpus=self.learner_gpus if role == "learner" else 0).remote()
        return _RayRole(self.ray, name, actor, role, self.config_dict, kwargs)

    def host(self, replay: _RayRole) -> str:
        return replay.node_ip

    def server_note(self, host: str, port: int) -> str:
        return f"{host}:{port}, listening on every network interface of that node"

    def stop(self, handles: Sequence[_RayRole], grace_s: float) -> None:
        # ray.kill ends a role without its clean-up; the learner's last checkpoint is
        # paired with a replay snapshot already (launch/resume.py).
        del grace_s
        for handle in handles:
            self.ray.kill(handle.actor, no_restart=True)

    def record(self, handles: Sequence[_RayRole]) -> None:
        write_pids(self.run_dir.logs / "pids.json", handles)

    def log(self, name: str) -> str:
        return f"the Ray worker logs of `{name}` (/tmp/ray/session_latest/logs)"


def launch_ray(config: Config, run_path: Path, num_actors: int, resume: bool = False,
               address: Optional[str] = None, learner_gpus: float = 0.0, progress: bool = True,
               port: Optional[int] = None) -> Dict:
    try:
        import ray
    except ImportError:
        raise RuntimeError("--launcher ray needs Ray: pip install -e '.[ray]'") from None
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False,
             log_to_driver=False, num_cpus=None if address else num_actors + 4)
    try:
        return launch(RayPlacement(ray, config, RunDir(run_path), learner_gpus), config, run_path, num_actors,
                      resume, progress, port)
    finally:
        ray.shutdown()
