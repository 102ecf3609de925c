"""`eosrl launch --launcher ray`: the same roles placed as Ray actors on a Ray
cluster (`ray.init(address=...)`) or on a local Ray instance.

Each Ray actor calls the role function `eosrl launch` would run as a process
(launch/roles.py, launch/prober.py), so both launchers run identical code. The replay server is
placed first and its node's IP is given to the other roles as the address;
the learner may ask for GPUs. Ray is an optional extra: `pip install -e .[ray]`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

from eosrl.agents.config import Config
from eosrl.launch.rundir import MetricsWriter, RunDir, read_metrics
from eosrl.launch.summary import finish_run


def _role_actor(ray):
    @ray.remote(max_restarts=0)
    class Role:
        """Runs one role (replay server, actor, learner, evaluator) in a Ray worker."""

        def node_ip(self) -> str:
            return ray.util.get_node_ip_address()

        def run(self, role: str, config_dict: dict, **kwargs) -> int:
            from eosrl.agents.config import from_dict
            from eosrl.launch import prober, roles
            config = from_dict(config_dict)
            if role == "replay":
                roles.run_replay_server(config, kwargs["port"], kwargs.get("run_dir"))
                return 0
            runs: Dict[str, Callable[..., int]] = {"actor": roles.run_actor, "learner": roles.run_learner,
                                                   "evaluator": roles.run_evaluator, "prober": prober.run_prober}
            run = runs[role]
            return run(config, **kwargs)

    return Role


def launch_ray(config: Config, run_path: Path, num_actors: int, resume: bool = False,
               address: Optional[str] = None, learner_gpus: float = 0.0, port: Optional[int] = None) -> Dict:
    try:
        import ray
    except ImportError:
        raise RuntimeError("--launcher ray needs Ray: pip install -e '.[ray]'") from None
    from eosrl.agents.builder import Builder, actor_shares
    from eosrl.agents.config import to_dict
    from eosrl.launch.channels import connect, inserted_steps
    from eosrl.launch.resume import env_step_offset
    from eosrl.launch.roles import EXIT_DIVERGED, probes_in_process
    start_time = time.time()
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False,
             log_to_driver=False, num_cpus=None if address else num_actors + 4)
    Role = _role_actor(ray)
    config_dict = to_dict(config)
    run_dir = str(run_path)
    if port is None:
        import portpicker
        port = portpicker.pick_unused_port()
    offset = env_step_offset(run_dir) if resume else 0

    replay_server = Role.options(num_cpus=1).remote()
    # Ask for the node first: a Ray actor runs one call at a time, and `run` never returns.
    host = ray.get(replay_server.node_ip.remote())
    replay_ref = replay_server.run.remote("replay", config_dict, port=port, run_dir=Path(run_dir))
    replay_address = f"{host}:{port}"
    print(f"eosrl: replay server on {replay_address}, listening on every network interface of that node "
          f"without authentication (README, Security)", file=sys.stderr)
    # The table is restored once the server answers: what it counts is where the actors continue.
    done = inserted_steps(connect(replay_address, timeout_s=120), Builder(config).preloaded_transitions()) + offset
    learner = Role.options(num_cpus=1, num_gpus=learner_gpus).remote()
    learner_ref = learner.run.remote("learner", config_dict, address=replay_address, run_dir=Path(run_dir))
    # Offline, the replay server loads the dataset and nobody acts for data.
    shares = [] if config.regime.mode == "offline" else actor_shares(config.run.total_env_steps, done, num_actors)
    actors = [Role.options(num_cpus=1).remote() for _ in shares]
    for i, (actor, (start, end)) in enumerate(zip(actors, shares)):
        actor.run.remote("actor", config_dict, address=replay_address, actor_id=i, num_actors=num_actors,
                         steps=end, run_dir=Path(run_dir), start_step=start)
    evaluator = Role.options(num_cpus=1).remote()
    evaluator.run.remote("evaluator", config_dict, address=replay_address, run_dir=Path(run_dir))
    probers, prober_refs = [], []
    if probes_in_process(config):
        probers = [Role.options(num_cpus=1).remote()]
        prober_refs = [probers[0].run.remote("prober", config_dict, address=replay_address, run_dir=Path(run_dir))]

    status, message = "completed", ""
    try:
        code = ray.get(learner_ref)
        if code == EXIT_DIVERGED:
            status = "diverged"  # the summary names the update from the divergence event
        elif code != 0:
            status, message = "learner_failed", f"the learner returned {code}"
        # The prober works through the snapshots still queued, then exits.
        ray.wait(prober_refs, num_returns=len(prober_refs), timeout=600)
    except KeyboardInterrupt:
        status = "interrupted"
    except ray.exceptions.RayError as e:
        status, message = "learner_died", f"the learner died: {e}"
    finally:
        # The learner paired its last checkpoint with a replay snapshot (launch/resume.py);
        # ray.kill ends the other roles without their clean-up, which they do not need.
        for handle in [evaluator, *actors, *probers, replay_server, learner]:
            ray.kill(handle, no_restart=True)
        ray.shutdown()
    del replay_ref
    run_dir_ = RunDir(run_dir)
    events = MetricsWriter(run_dir_, tensorboard=False)
    # Ray's evaluator already evaluated the final parameters: its last record is the final one.
    evals = list(read_metrics(run_dir_.metrics, "eval")) if run_dir_.metrics.exists() else []
    summary = finish_run(run_dir_, events, status, start_time, message=message,
                         final_eval=evals[-1]["return_mean"] if evals else None)
    events.close()
    return summary
