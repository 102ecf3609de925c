"""`eosrl launch` with the local launcher: every role as its own OS process.

The launcher starts the replay server, the learner, N actors, the evaluator
and, with `probe.mode: process`, the prober (each an `eosrl ROLE ...` child of
launch/supervisor.py, logs in RUN_DIR/logs/), shows one progress display,
restarts actors and the prober when they die (bounded), stops the run with a
clear message when the learner or the replay server dies, and on Ctrl-C or
SIGTERM stops the learner first (it writes its final checkpoint while actors
still feed it), then everything else, leaving no process behind. When the
learner completes, the prober first works through the snapshots still queued.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from eosrl.agents.builder import Builder, actor_shares
from eosrl.agents.config import Config
from eosrl.launch.resume import env_step_offset
from eosrl.launch.roles import EXIT_DIVERGED, probes_in_process
from eosrl.launch.rundir import MetricsWriter, RunDir
from eosrl.launch.summary import divergence_message, finish_run, last_checkpoint_note
from eosrl.launch.supervisor import Child, stop, write_pids

STOP_GRACE_S = 8.0
PROBER_DRAIN_S = 600.0  # for the snapshots queued when the learner ends (probe.max_queued of them)


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


class _LocalRun:
    """The children of one launch and what the launcher knows about them."""

    def __init__(self, config: Config, run_dir: RunDir, num_actors: int, port: int, resume: bool):
        self.config, self.run_dir, self.num_actors = config, run_dir, num_actors
        self.logs = run_dir.logs
        self.logs.mkdir(exist_ok=True)
        self.address = f"localhost:{port}"
        self.preloaded = Builder(config).preloaded_transitions()
        self.offset = env_step_offset(run_dir.path) if resume else 0
        self.offline = config.regime.mode == "offline"  # the server loads the dataset; nobody acts for data
        config_path, where = str(run_dir.config), ["--run-dir", str(run_dir.path)]
        replay = ["--replay", self.address]
        self.replay_server = Child("replay", ["replay-server", config_path, "--port", str(port), *where],
                                   self.logs / "replay.log")
        self.learner = Child("learner", ["learner", config_path, *replay, *where], self.logs / "learner.log")
        self.evaluator = Child("evaluator", ["evaluator", config_path, *replay, *where], self.logs / "evaluator.log")
        self._prober_args = ["prober", config_path, *replay, *where]
        self.prober = self._new_prober() if probes_in_process(config) else None
        self.actors: List[Child] = []
        self.shares: List[Tuple[int, int]] = []
        self.actor_steps: Dict[int, int] = {}
        self.done_steps = 0
        self.updates = 0  # the learner's, as its last train record said

    @property
    def children(self) -> List[Child]:
        return [self.replay_server, self.learner, self.evaluator, *self.actors, *self._prober_list()]

    def _prober_list(self) -> List[Child]:
        return [self.prober] if self.prober is not None else []

    def _new_prober(self) -> Child:
        return Child("prober", self._prober_args, self.logs / "prober.log")

    def actor(self, i: int) -> Child:
        return Child(f"actor_{i}", ["actor", str(self.run_dir.config), "--replay", self.address, "--id", str(i),
                                    "--num-actors", str(self.num_actors), "--steps", str(self.shares[i][1]),
                                    "--start-step", str(self.actor_steps[i]), "--run-dir", str(self.run_dir.path)],
                     self.logs / f"actor_{i}.log")

    def start(self, events: MetricsWriter) -> None:
        from eosrl.launch.channels import connect, inserted_steps
        self.replay_server.start()
        write_pids(self.logs / "pids.json", [self.replay_server])
        self.client = connect(self.address, timeout_s=120)
        # The table is restored by now: what it counts is where the actors continue.
        self.done_steps = inserted_steps(self.client, self.preloaded) + self.offset
        if not self.offline:
            self.shares = actor_shares(self.config.run.total_env_steps, self.done_steps, self.num_actors)
        self.actor_steps = {i: start for i, (start, _) in enumerate(self.shares)}
        self.actors = [self.actor(i) for i in range(len(self.shares))]
        events.write("event", 0, event="launch", launcher="local", address=self.address,
                     num_actors=self.num_actors, env_steps=self.done_steps)
        for child in [self.learner, *self.actors, self.evaluator, *self._prober_list()]:
            child.start()
        write_pids(self.logs / "pids.json", self.children)

    def env_steps(self) -> int:
        from eosrl.launch.channels import inserted_steps
        return inserted_steps(self.client, self.preloaded) + self.offset

    def check(self, events: MetricsWriter, updates: int) -> Optional[Tuple[str, str]]:
        """(status, message) once the run must end; restarts dead actors and a dead
        prober (bounded)."""
        self.updates = updates
        code = self.learner.poll()
        if code is not None:
            if code == EXIT_DIVERGED:
                return "diverged", divergence_message(self.run_dir)
            if code != 0:
                return "learner_died", self._death("learner", code)
            return "completed", ""
        for i, child in enumerate(self.actors):
            restarted = self._restart(child, events, updates, "actor", lambda: self.actor(i),
                                      actor=i, env_steps=self.actor_steps[i])
            if restarted is not None:
                self.actors[i] = restarted
        if self.prober is not None:
            self.prober = self._restart(self.prober, events, updates, "prober", self._new_prober) or self.prober
        code = self.replay_server.poll()
        if code is not None:
            return "replay_died", self._death("replay server", code)
        return None

    def _restart(self, child: Child, events: MetricsWriter, updates: int, role: str, make, **values) -> Optional[Child]:
        """A new child in place of one that died (None if it lives, finished, or has used up
        distributed.max_actor_restarts)."""
        code = child.poll()
        if code is None or code == 0:
            return None
        if child.restarts < self.config.distributed.max_actor_restarts:
            events.write("event", updates, event=f"{role}_restarted", exit_code=code, restart=child.restarts + 1,
                         **values)
            new = make()
            new.restarts = child.restarts + 1
            new.start()
            write_pids(self.logs / "pids.json", [*self.children, new])
            return new
        if child.restarts >= 0:
            events.write("event", updates, event=f"{role}_given_up", exit_code=code, **values)
            child.restarts = -1  # reported once
        return None

    def wait_for_prober(self, events: MetricsWriter) -> None:
        """After the learner's end marker the prober works through the queue, then exits
        (restarted, bounded, if it dies meanwhile)."""
        if self.prober is None or self.prober.poll() == 0:
            return
        print("waiting for the prober to probe the snapshots still queued", flush=True)
        deadline = time.time() + PROBER_DRAIN_S
        while time.time() < deadline:
            self.prober = self._restart(self.prober, events, self.updates, "prober", self._new_prober) or self.prober
            code = self.prober.poll()
            if code == 0 or (code is not None and self.prober.restarts < 0):  # done, or given up
                return
            time.sleep(0.5)

    def _death(self, role: str, code: int) -> str:
        log = self.logs / ("learner.log" if role == "learner" else "replay.log")
        return f"the {role} exited with code {code} (log: {log}); {last_checkpoint_note(self.run_dir)}"

    def stop(self) -> None:
        # Learner first (its final checkpoint needs batches, which need live actors).
        stop([self.learner], STOP_GRACE_S)
        stop([self.evaluator, *self.actors, *self._prober_list()], 2.0)
        stop([self.replay_server], 4.0)


def launch_local(config: Config, run_path: Path, num_actors: int, resume: bool = False,
                 progress: bool = True, port: Optional[int] = None) -> Dict:
    start_time = time.time()
    run_dir = RunDir(run_path).create()
    if port is None:
        import portpicker
        port = portpicker.pick_unused_port()
    print(f"eosrl: replay server on port {port} of every network interface, without authentication "
          f"(README, Security)", file=sys.stderr)
    events = MetricsWriter(run_dir, tensorboard=False)
    tail = _MetricsTail(run_dir.metrics)
    tail.new_records()  # start after what an earlier (resumed) run wrote
    run = _LocalRun(config, run_dir, num_actors, port, resume)
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
    final_eval = None
    if status == "completed":
        from eosrl.agents import checkpoint
        from eosrl.launch.evaluate import evaluate_checkpoint
        latest = checkpoint.latest(run_dir.checkpoints)
        if latest is not None:
            final_eval = evaluate_checkpoint(config, latest, run_dir.path)["return_mean"]
    summary = finish_run(run_dir, events, status, start_time, final_eval=final_eval, message=message)
    events.close()
    return summary


def _watch(run: _LocalRun, events: MetricsWriter, tail: _MetricsTail, progress: bool) -> Tuple[str, str]:
    """Supervises the run once a second, with one progress line, until it ends."""
    config, bar = run.config, None
    if progress:  # env steps, or learner updates offline
        from tqdm import tqdm
        bar = tqdm(total=config.run.total_updates if run.offline else config.run.total_env_steps,
                   initial=0 if run.offline else run.done_steps, unit="update" if run.offline else "step",
                   dynamic_ncols=True)
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
                bar.update(min(updates if run.offline else steps, bar.total) - bar.n)
                bar.set_postfix(sps=f"{sps:.0f}", upd_s=f"{update_rate:.0f}" if update_rate is not None else "-",
                                eval=f"{last_eval:.1f}" if last_eval is not None else "-", refresh=True)
    finally:
        if bar is not None:
            bar.close()
