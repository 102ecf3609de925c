"""The one orchestration behind `eosrl launch`, whichever launcher places the roles.

`launch` starts the replay server, the learner, N actors, the evaluator and, with
`probe.mode: process`, the prober; shows one progress display (launch/progress.py);
restarts actors and the prober when they die (bounded by
`distributed.max_actor_restarts`, with `ROLE_restarted` / `ROLE_given_up` events);
stops the run with a clear message when the learner or the replay server dies; on
Ctrl-C or SIGTERM stops the learner first (it writes its final checkpoint while actors
still feed it), then everything else; when the learner completes, waits for the prober
to work through the snapshots still queued; and ends a completed run with the final
evaluation of its last checkpoint (`eosrl evaluate`'s record) beside a random policy on
the same episodes, then the summary (launch/summary.py).

What differs between launchers is only how a role is started, polled and stopped:
a `Placement` (launch/local.py: subprocesses; launch/ray_launcher.py: Ray actors).
Model: Acme's run_experiment, one code path for every way of running.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Generic, List, Optional, Protocol, Sequence, Tuple, TypeVar

from eosrl.launch.builder import Builder, actor_shares
from eosrl.launch.config import Config
from eosrl.launch.progress import progress_bar
from eosrl.launch.resume import env_step_offset
from eosrl.launch.roles import EXIT_DIVERGED, probes_in_process
from eosrl.launch.rundir import MetricsWriter, RunDir
from eosrl.launch.summary import divergence_message, finish_run, last_checkpoint_note

STOP_GRACE_S = 8.0
PROBER_DRAIN_S = 600.0  # for the snapshots queued when the learner ends (probe.max_queued of them)


class Handle(Protocol):
    """One started role: `poll()` is None while it runs, else its exit code."""
    name: str

    def poll(self) -> Optional[int]: ...


H = TypeVar("H", bound=Handle)


class Placement(Protocol, Generic[H]):
    """How one launcher starts, stops and describes roles. `start` takes the role
    function's own arguments (launch/roles.py: `address`, `actor_id`, `steps`, ...)."""
    launcher: str

    def start(self, name: str, role: str, **kwargs: Any) -> H: ...

    def host(self, replay: H) -> str: ...

    def server_note(self, host: str, port: int) -> str: ...

    def stop(self, handles: Sequence[H], grace_s: float) -> None: ...

    def record(self, handles: Sequence[H]) -> None: ...

    def log(self, name: str) -> str: ...


class _MetricsTail:
    """Reads records appended to metrics.jsonl since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new_records(self) -> List[Dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind("\n") + 1]
        self.offset += len(complete.encode())
        records = []
        for line in complete.splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return records


class _Run:
    """The roles of one launch and what the launcher knows about them."""

    def __init__(self, placement: Placement[Any], config: Config, run_dir: RunDir, num_actors: int, port: int,
                 resume: bool):
        self.placement, self.config, self.run_dir, self.num_actors = placement, config, run_dir, num_actors
        self.port = port
        self.preloaded = Builder(config).preloaded_transitions()
        self.offset = env_step_offset(run_dir.path) if resume else 0
        self.offline = config.regime.mode == "offline"  # the server loads the dataset; nobody acts for data
        self.restarts: Dict[str, int] = {}  # by role name; -1 once given up (reported once)
        self.replay_server: Optional[Handle] = None
        self.learner: Optional[Handle] = None
        self.evaluator: Optional[Handle] = None
        self.actors: List[Handle] = []
        self.prober: Optional[Handle] = None
        self.shares: List[Tuple[int, int]] = []
        self.actor_steps: Dict[int, int] = {}
        self.done_steps = 0
        self.updates = 0  # the learner's, as its last train record said

    @property
    def handles(self) -> List[Handle]:
        return [h for h in (self.replay_server, self.learner, self.evaluator, *self.actors, self.prober)
                if h is not None]

    def _start(self, name: str, role: str, **kwargs: Any) -> Handle:
        return self.placement.start(name, role, run_dir=self.run_dir.path, **kwargs)

    def _actor(self, i: int) -> Handle:
        return self._start(f"actor_{i}", "actor", address=self.address, actor_id=i, num_actors=self.num_actors,
                           steps=self.shares[i][1], start_step=self.actor_steps[i])

    def _new_prober(self) -> Handle:
        return self._start("prober", "prober", address=self.address)

    def start(self, events: MetricsWriter) -> None:
        from eosrl.launch.channels import connect, inserted_steps
        self.replay_server = self._start("replay", "replay", port=self.port)
        self.placement.record(self.handles)
        host = self.placement.host(self.replay_server)
        self.address = f"{host}:{self.port}"
        print(f"eosrl: replay server on {self.placement.server_note(host, self.port)}, without authentication "
              f"(README, Security)", file=sys.stderr)
        self.client = connect(self.address, timeout_s=120)
        # The table is restored by now: what it counts is where the actors continue.
        self.done_steps = inserted_steps(self.client, self.preloaded) + self.offset
        if not self.offline:
            self.shares = actor_shares(self.config.run.total_env_steps, self.done_steps, self.num_actors)
        self.actor_steps = {i: start for i, (start, _) in enumerate(self.shares)}
        events.write("event", 0, event="launch", launcher=self.placement.launcher, address=self.address,
                     num_actors=self.num_actors, env_steps=self.done_steps)
        self.learner = self._start("learner", "learner", address=self.address)
        self.actors = [self._actor(i) for i in range(len(self.shares))]
        self.evaluator = self._start("evaluator", "evaluator", address=self.address)
        self.prober = self._new_prober() if probes_in_process(self.config) else None
        self.placement.record(self.handles)

    def env_steps(self) -> int:
        from eosrl.launch.channels import inserted_steps
        return inserted_steps(self.client, self.preloaded) + self.offset

    def check(self, events: MetricsWriter, updates: int) -> Optional[Tuple[str, str]]:
        """(status, message) once the run must end; restarts dead actors and a dead
        prober (bounded)."""
        self.updates = updates
        assert self.learner is not None and self.replay_server is not None  # started
        code = self.learner.poll()
        if code is not None:
            if code == EXIT_DIVERGED:
                return "diverged", divergence_message(self.run_dir)
            if code != 0:
                return "learner_died", self._death("learner", code)
            return "completed", ""
        for i, actor in enumerate(self.actors):
            self.actors[i] = self._restart(actor, events, "actor", lambda: self._actor(i),
                                           actor=i, env_steps=self.actor_steps[i])
        if self.prober is not None:
            self.prober = self._restart(self.prober, events, "prober", self._new_prober)
        code = self.replay_server.poll()
        if code is not None:
            return "replay_died", self._death("replay", code)
        return None

    def _restart(self, handle: Handle, events: MetricsWriter, role: str, make, **values: Any) -> Handle:
        """A new role in place of one that died; `handle` itself while it lives, once it
        finished, or once distributed.max_actor_restarts is used up."""
        code = handle.poll()
        restarts = self.restarts.get(handle.name, 0)
        if code is None or code == 0 or restarts < 0:
            return handle
        if restarts < self.config.distributed.max_actor_restarts:
            events.write("event", self.updates, event=f"{role}_restarted", exit_code=code, restart=restarts + 1,
                         **values)
            new = make()
            self.restarts[handle.name] = restarts + 1
            self.placement.record([h if h is not handle else new for h in self.handles])
            return new
        events.write("event", self.updates, event=f"{role}_given_up", exit_code=code, **values)
        self.restarts[handle.name] = -1
        return handle

    def wait_for_prober(self, events: MetricsWriter) -> None:
        """After the learner's end marker the prober works through the queue, then exits
        (restarted, bounded, if it dies meanwhile)."""
        if self.prober is None or self.prober.poll() == 0:
            return
        print("waiting for the prober to probe the snapshots still queued", flush=True)
        deadline = time.time() + PROBER_DRAIN_S
        while time.time() < deadline:
            self.prober = self._restart(self.prober, events, "prober", self._new_prober)
            code = self.prober.poll()
            if code == 0 or (code is not None and self.restarts.get("prober", 0) < 0):  # done, or given up
                return
            time.sleep(0.5)

    def _death(self, name: str, code: int) -> str:
        role = "replay server" if name == "replay" else name
        return (f"the {role} exited with code {code} (log: {self.placement.log(name)}); "
                f"{last_checkpoint_note(self.run_dir)}")

    def stop(self) -> None:
        # Learner first (its final checkpoint needs batches, which need live actors), the
        # replay server last (that checkpoint asks it for a table snapshot).
        learner, server = self.learner, self.replay_server
        self.placement.stop([h for h in [learner] if h is not None], STOP_GRACE_S)
        self.placement.stop([h for h in self.handles if h is not learner and h is not server], 2.0)
        self.placement.stop([h for h in [server] if h is not None], 4.0)


def launch(placement: Placement[Any], config: Config, run_path: Path, num_actors: int, resume: bool = False,
           progress: bool = True, port: Optional[int] = None) -> Dict:
    """Runs one launch to its end and returns its summary (the `finished` event)."""
    start_time = time.time()
    run_dir = RunDir(run_path).create()
    run_dir.logs.mkdir(exist_ok=True)
    if port is None:
        import portpicker
        port = portpicker.pick_unused_port()
    events = MetricsWriter(run_dir, tensorboard=False)
    tail = _MetricsTail(run_dir.metrics)
    tail.new_records()  # start after what an earlier (resumed) run wrote
    run = _Run(placement, config, run_dir, num_actors, port, resume)
    status, message = "interrupted", ""
    try:
        run.start(events)
        status, message = _watch(run, events, tail, progress)
        if status in ("completed", "diverged"):
            run.wait_for_prober(events)
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        run.stop()
    extra = _final_evaluation(config, run_dir, events) if status == "completed" else {}
    summary = finish_run(run_dir, events, status, start_time, message=message, **extra)
    events.close()
    return summary


def _final_evaluation(config: Config, run_dir: RunDir, events: MetricsWriter) -> Dict[str, Any]:
    """The final checkpoint evaluated as `eosrl evaluate` does (its seeds, an `eval` record
    with source "eosrl evaluate"), beside a random policy on the same episodes."""
    from eosrl.agents import checkpoint
    from eosrl.launch.evaluate import evaluate_checkpoint, random_policy_return
    latest = checkpoint.latest(run_dir.checkpoints)
    if latest is None:
        return {}
    return {"final_eval": evaluate_checkpoint(config, latest, run_dir.path)["return_mean"],
            "random_policy_return": random_policy_return(config, latest, events)}


def _watch(run: _Run, events: MetricsWriter, tail: _MetricsTail, progress: bool) -> Tuple[str, str]:
    """Supervises the run once a second, with one progress line, until it ends."""
    config, bar = run.config, None
    if progress:  # env steps, or learner updates offline
        bar = progress_bar(config.run.total_updates if run.offline else config.run.total_env_steps,
                           initial=0 if run.offline else run.done_steps,
                           unit="update" if run.offline else "step")
    # Updates/s is the learner's own measure from its train records: `updates` only moves
    # once per log interval, so a per-second difference would read 0 between records.
    updates, update_rate, last_eval = 0, None, None
    tick = (time.time(), run.done_steps)
    try:
        while True:
            time.sleep(1.0)
            for record in tail.new_records():
                if record.get("kind") == "eval":
                    last_eval = record.get("return_mean")
                elif record.get("kind") == "train":
                    updates = record["step"]
                    update_rate = record.get("updates_per_second", update_rate)
                elif record.get("kind") == "actor":
                    run.actor_steps[record["actor"]] = record["env_steps"]
            ended = run.check(events, updates)
            if ended is not None:
                return ended
            if bar is not None:
                steps, now = run.env_steps(), time.time()
                sps = (steps - tick[1]) / max(now - tick[0], 1e-9)
                tick = (now, steps)
                bar.set_postfix(sps=f"{sps:.0f}", upd_s=f"{update_rate:.0f}" if update_rate is not None else "-",
                                eval=f"{last_eval:.1f}" if last_eval is not None else "-", refresh=False)
                # After the postfix, so the display (and a line in a log file) shows the newest values.
                bar.update(min(updates if run.offline else steps, bar.total) - bar.n)
    finally:
        if bar is not None:
            bar.close()
