"""`eosrl launch` with the local launcher: every role as its own OS process.

The launcher starts the replay server, the learner, N actors and the
evaluator (each `python -m launch.cli ROLE ...`, logs in RUN_DIR/logs/),
shows one progress display, restarts actors that die (bounded), stops the
run with a clear message when the learner dies, and on Ctrl-C or SIGTERM
stops the learner first (it writes its final checkpoint while actors still
feed it), then everything else, leaving no process behind.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from agents import checkpoint
from agents.config import Config
from launch.lifeline import child_environment
from launch.resume import env_step_offset
from launch.rundir import MetricsWriter, RunDir

STOP_GRACE_S = 8.0


class Child:
    def __init__(self, name: str, args: List[str], log_dir: Path):
        self.name, self.args, self.log_dir = name, args, log_dir
        self.restarts = 0
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        log = open(self.log_dir / f"{self.name}.log", "a")
        # Named as the child's parent: the child ends itself if the launcher is killed.
        env = child_environment(dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1"))
        # A session of its own: a terminal's Ctrl-C reaches only the launcher,
        # which then stops the roles in the order that keeps the checkpoint good.
        self.proc = subprocess.Popen([sys.executable, "-m", "launch.cli", *self.args],
                                     stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()

    def poll(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=max(0.0, timeout))
            return True
        except subprocess.TimeoutExpired:
            return False


def _write_pids(path: Path, children: List[Child]) -> None:
    """RUN_DIR/logs/pids.json: which process is which role (for operators and tests)."""
    import json
    pids = {"launcher": os.getpid()}
    pids.update({c.name: c.proc.pid for c in children if c.proc is not None})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(pids))
    os.replace(tmp, path)


def _free_port() -> int:
    import portpicker
    return portpicker.pick_unused_port()


def _stop(children: List[Child], deadline_s: float) -> None:
    """SIGTERM, wait until the deadline, then SIGKILL whatever is left."""
    for child in children:
        child.signal(signal.SIGTERM)
    end = time.time() + deadline_s
    for child in children:
        child.wait(end - time.time())
    for child in children:
        if child.poll() is None:
            child.signal(signal.SIGKILL)
            child.wait(2.0)


class _MetricsTail:
    """Reads records appended to metrics.jsonl since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new_records(self):
        import json
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


def launch_local(config: Config, run_path: Path, num_actors: int, resume: bool = False,
                 progress: bool = True, port: Optional[int] = None) -> Dict:
    start_time = time.time()
    run_dir = RunDir(run_path).create()
    logs = run_dir.path / "logs"
    logs.mkdir(exist_ok=True)
    config_path = str(run_dir.config)
    port = port or _free_port()
    address = f"localhost:{port}"
    events = MetricsWriter(run_dir, tensorboard=False)
    tail = _MetricsTail(run_dir.metrics)
    tail.new_records()  # start after what an earlier (resumed) run wrote
    print(f"eosrl: replay server on port {port} of every network interface, without authentication "
          f"(README, Security)", file=sys.stderr)

    from launch.roles import EXIT_DIVERGED, actor_shares, connect, inserted_steps
    from launch.train import preloaded_transitions
    preloaded = preloaded_transitions(config)
    offset = env_step_offset(run_dir.path) if resume else 0
    replay_server = Child("replay", ["replay-server", config_path, "--port", str(port),
                                     "--run-dir", str(run_dir.path)], logs)
    learner = Child("learner", ["learner", config_path, "--replay", address,
                                "--run-dir", str(run_dir.path)], logs)
    evaluator = Child("evaluator", ["evaluator", config_path, "--replay", address,
                                    "--run-dir", str(run_dir.path)], logs)
    offline = config.regime.mode == "offline"  # the server loads the dataset; nobody acts for data
    actors: List[Child] = []
    shares: List[tuple] = []
    actor_steps: Dict[int, int] = {}

    def actor_child(i: int) -> Child:
        return Child(f"actor_{i}", ["actor", config_path, "--replay", address, "--id", str(i),
                                    "--num-actors", str(num_actors), "--steps", str(shares[i][1]),
                                    "--start-step", str(actor_steps[i]),
                                    "--run-dir", str(run_dir.path)], logs)

    status, message = "completed", ""
    last_eval: Optional[float] = None
    updates, done_steps = 0, 0
    bar = None
    try:
        replay_server.start()
        _write_pids(logs / "pids.json", [replay_server])
        client = connect(address, timeout_s=120)
        # The table is restored by now: what it counts is where the actors continue.
        done_steps = inserted_steps(client, preloaded) + offset
        shares = [] if offline else actor_shares(config.run.total_env_steps, done_steps, num_actors)
        actor_steps.update({i: start for i, (start, _) in enumerate(shares)})
        actors = [actor_child(i) for i in range(len(shares))]
        events.write("event", 0, event="launch", launcher="local", address=address,
                     num_actors=num_actors, resume=resume, env_steps=done_steps)
        learner.start()
        for child in actors:
            child.start()
        evaluator.start()
        everyone = [replay_server, learner, evaluator, *actors]
        _write_pids(logs / "pids.json", everyone)
        if progress:  # env steps, or learner updates offline
            from tqdm import tqdm
            bar = tqdm(total=config.run.total_updates if offline else config.run.total_env_steps,
                       initial=0 if offline else done_steps, unit="update" if offline else "step",
                       dynamic_ncols=True)
        # Updates/s is the learner's own measure from its train records: `updates` only moves
        # once per log interval, so a per-second difference would read 0 between records.
        tick, tick_steps, update_rate = time.time(), done_steps, None
        while True:
            time.sleep(1.0)
            for record in tail.new_records():
                if record.get("kind") == "eval":
                    last_eval = record.get("return_mean")
                elif record.get("kind") == "train":
                    updates = record["step"]
                    update_rate = record.get("updates_per_second", update_rate)
                elif record.get("kind") == "actor":
                    actor_steps[record["actor"]] = record["env_steps"]
            code = learner.poll()
            if code is not None:
                if code == EXIT_DIVERGED:
                    status, message = "diverged", _divergence_message(run_dir)
                elif code != 0:
                    status, message = "learner_died", _death_message("learner", code, logs, run_dir)
                break
            for i, child in enumerate(actors):
                code = child.poll()
                if code is None or code == 0:
                    continue
                if child.restarts < config.distributed.max_actor_restarts:
                    restarts = child.restarts + 1
                    events.write("event", updates, event="actor_restarted", actor=i, exit_code=code,
                                 restart=restarts, env_steps=actor_steps[i])
                    actors[i] = actor_child(i)
                    actors[i].restarts = restarts
                    actors[i].start()
                    everyone = [replay_server, learner, evaluator, *actors]
                    _write_pids(logs / "pids.json", everyone)
                elif child.restarts >= 0:
                    events.write("event", updates, event="actor_given_up", actor=i, exit_code=code)
                    child.restarts = -1  # reported once
            code = replay_server.poll()
            if code is not None:
                status, message = "replay_died", _death_message("replay server", code, logs, run_dir)
                break
            if bar is not None:
                steps = inserted_steps(client, preloaded) + offset
                now = time.time()
                sps = (steps - tick_steps) / max(now - tick, 1e-9)
                tick, tick_steps = now, steps
                bar.update(min(updates if offline else steps, bar.total) - bar.n)
                bar.set_postfix(sps=f"{sps:.0f}", upd_s=f"{update_rate:.0f}" if update_rate is not None else "-",
                                eval=f"{last_eval:.1f}" if last_eval is not None else "-", refresh=True)
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        if bar is not None:
            bar.close()
        # Learner first (its final checkpoint needs batches, which need live actors).
        _stop([learner], STOP_GRACE_S)
        _stop([evaluator, *actors], 2.0)
        _stop([replay_server], 4.0)
    for record in tail.new_records():
        if record.get("kind") == "eval":
            last_eval = record.get("return_mean")
    return _summary(config, run_dir, status, message, last_eval, start_time, events)


def _summary(config: Config, run_dir: RunDir, status: str, message: str, last_eval: Optional[float],
             start_time: float, events: MetricsWriter) -> Dict:
    """The run's summary (also written as a `launch_finished` event). Only a completed run
    gets a final evaluation; the last checkpoint never holds non-finite parameters."""
    latest = checkpoint.latest(run_dir.checkpoints)
    meta = checkpoint.read_meta(latest) if latest else {}
    final_eval = None
    if status == "completed" and latest is not None:
        from launch.evaluate import evaluate_checkpoint
        final_eval = evaluate_checkpoint(config, latest, run_dir.path)["return_mean"]
    summary = {
        "status": status,
        "message": message,
        "run_dir": str(run_dir.path),
        "env_steps": int(meta.get("env_steps", 0)),
        "learner_updates": int(meta.get("learner_step", 0)),
        "final_eval_return": final_eval,
        "last_eval_return": last_eval,
        "checkpoint": str(latest) if latest else None,
        "wall_seconds": round(time.time() - start_time, 1),
    }
    events.write("event", summary["learner_updates"], event="launch_finished",
                 **{k: v for k, v in summary.items() if k != "learner_updates"})
    events.close()
    return summary


def _last_checkpoint_note(run_dir: RunDir) -> str:
    latest = checkpoint.latest(run_dir.checkpoints)
    if latest is None:
        return "it wrote no checkpoint, so the run cannot be resumed; start it again"
    step = checkpoint.read_meta(latest).get("learner_step")
    return f"the last checkpoint (update {step}) is intact: eosrl launch --resume {run_dir.path}"


def _death_message(role: str, code: int, logs: Path, run_dir: RunDir) -> str:
    log = logs / ("learner.log" if role == "learner" else "replay.log")
    return f"the {role} exited with code {code} (log: {log}); {_last_checkpoint_note(run_dir)}"


def _divergence_message(run_dir: RunDir) -> str:
    from launch.rundir import read_metrics
    events = [r for r in read_metrics(run_dir.metrics, "event") if r.get("event") == "divergence"]
    where = f" at update {events[-1]['step']}" if events else ""
    latest = checkpoint.latest(run_dir.checkpoints)
    kept = (f"the last good checkpoint is {latest} (update {checkpoint.read_meta(latest).get('learner_step')})"
            if latest else "no checkpoint was written before it")
    return f"the learner diverged: the TD loss became non-finite{where}; {kept}"
