"""`eosrl train`: the roles of a run in one process, around an in-process Reverb
server (model: Acme's `run_experiment` with its learning actor).

The actor steps its env and writes to replay; after each env step the learner
loop (launch/learning.py, the same loop as the distributed learner role) makes
the updates the run's `Schedule` says are due, and evaluates in-process where
the distributed run has an evaluator role. Offline, there is no actor and no
Reverb: the dataset is loaded once onto the device (agents/offline.py) and the
loop runs `run.total_updates` as fused updates that draw their own batches.
Everything is built by launch/builder.py.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from eosrl.agents import offline
from eosrl.agents.actor import Actor
from eosrl.launch.builder import Builder
from eosrl.launch.config import Config, save_config
from eosrl.launch import resume as resume_lib
from eosrl.launch.learning import LearnerLoop, all_finite
from eosrl.launch.lifeline import stop_on_signals
from eosrl.launch.progress import progress_bar
from eosrl.launch.rundir import MetricsWriter, RunDir
from eosrl.launch.summary import finish_run


class _InProcessReplay:
    """The in-process Reverb server, its adder, and a batch stream opened on first use
    (the server must hold min_size items before sampling starts)."""

    def __init__(self, builder: Builder, run_dir: RunDir):
        import reverb  # here, not at the top: the offline path (and launch/train_seeds.py) runs without it
        from eosrl.agents import replay
        self.snapshots = resume_lib.snapshots_replay(builder.config)
        if self.snapshots:
            resume_lib.prepare_replay(run_dir.path)  # only the snapshot paired with the checkpoint stays
        self.server = replay.start_server([builder.make_replay_table(rate_limited=False)],
                                          checkpoint_dir=str(run_dir.replay.resolve()) if self.snapshots else None)
        self.client = reverb.Client(f"localhost:{self.server.port}")
        self.adder = builder.make_adder(self.client)
        self.initial_size = replay.table_size(self.client)
        self._batch_size = builder.config.replay.batch_size
        self._stream: Optional[replay.BatchStream] = None

    def size(self) -> int:
        from eosrl.agents import replay
        return replay.table_size(self.client)

    def ready(self, min_size: int) -> bool:
        return self._stream is not None or self.initial_size + self.adder.items_written >= min_size

    def batches(self) -> Iterator[Any]:
        from eosrl.agents import replay
        while True:
            if self._stream is None:
                self.adder.flush()
                self._stream = replay.batch_stream(f"localhost:{self.server.port}", self._batch_size)
            yield next(self._stream)

    def snapshot(self) -> str:
        self.adder.flush()
        return self.client.checkpoint()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self.adder.close()
        self.server.stop()


class _DeviceData:
    """The offline regime's dataset, loaded once onto the device (agents/offline.py); the
    learner draws its batches from it with its own key, so there is no replay server."""
    snapshots = False  # the dataset is reloaded on resume, as offline replay is

    def __init__(self, builder: Builder, loaded: Optional[Tuple[offline.DeviceDataset, Dict[str, Any]]] = None):
        self.data, self.loaded = offline.load(builder) if loaded is None else loaded

    def size(self) -> int:
        return self.data.size

    def close(self) -> None:
        pass


def train(config: Config, run_path: str | Path, resume: bool = False,
          progress: bool = True) -> Dict[str, Any]:
    """Runs (or resumes) a single-process run in any regime; returns the summary."""
    start_time = time.time()
    if config.probe.enabled and config.probe.mode == "process":
        print("eosrl train probes inline, between updates (probe.mode: process is for eosrl launch)",
              file=sys.stderr)
    builder = Builder(config)
    on_device = builder.schedule().offline
    if on_device:
        offline.check_fits(builder)  # before anything starts
    run_dir = RunDir(run_path).create()
    if not resume:
        save_config(config, run_dir.config)
    data = _DeviceData(builder) if on_device else _InProcessReplay(builder, run_dir)
    metrics = MetricsWriter(run_dir)
    run = _Run(builder, run_dir, metrics, data, resume)
    try:
        run.start(resume)
        status = "failed"  # what the final checkpoint and summary say if an exception ends the run
        with stop_on_signals() as signals:
            try:
                status = run.offline_loop(progress) if builder.schedule().offline else run.online_loop(progress)
            except BaseException as error:
                if not signals.stopped(error):
                    raise
                status = "interrupted"
                metrics.write("event", run.loop.learner.step, env_steps=run.env_steps, event="interrupted")
            finally:
                status = run.finish(status)
        summary = run.conclude(status, start_time)
    finally:
        metrics.close()
        data.close()
    return summary


class _Run:
    """The parts of one in-process run and its two loops (online, offline)."""

    def __init__(self, builder: Builder, run_dir: RunDir, metrics: MetricsWriter,
                 data: _InProcessReplay | _DeviceData, resume: bool):
        config = builder.config
        self.builder, self.config, self.metrics, self.data = builder, config, metrics, data
        self.env_steps, self.episodes = 0, 0
        self.schedule = builder.schedule()
        self.recorder = None
        if config.replay.record_to and not self.schedule.offline:
            from eosrl.agents.dataset import DatasetWriter
            self.recorder = DatasetWriter.for_env(config.replay.record_to, config.env, resume=resume,
                                                  agent={"kind": config.agent.kind, "run": str(run_dir.path)})
        self.actor: Optional[Actor] = None
        if isinstance(data, _DeviceData):
            batches: Iterator[Any] = iter(())  # the learner draws its own
            sample_items: Callable[[int], Any] = offline.probe_sampler(data.data, config.run.seed,
                                                                        lambda: self.loop.learner.step)
        else:
            from eosrl.agents import replay
            batches = data.batches()
            sample_items = lambda n: replay.sample_items(data.client, n, builder.signature())  # noqa: E731
            self.actor = builder.make_actor(data.adder, config.run.seed, recorder=self.recorder)
        self.evaluator = builder.make_evaluator()
        snapshot = data.snapshot if isinstance(data, _InProcessReplay) and data.snapshots else None
        self.loop: LearnerLoop = LearnerLoop(builder, run_dir, metrics, batches, env_steps=lambda: self.env_steps,
                                sample_items=sample_items, snapshot=snapshot,
                                evaluate=self.evaluate, record_values=self._record_values,
                                checkpoint_meta=lambda: {"episodes": self.episodes})
        self._tick = (time.time(), 0)

    def start(self, resume: bool) -> None:
        """Restores a resumed run and loads a regime's dataset into the fresh table."""
        learner = self.loop.learner
        if resume:
            restored = self.loop.restore()
            if restored is None:
                raise FileNotFoundError(f"{self.loop.run_dir.checkpoints}: no checkpoint to resume from")
            path, meta = restored
            self.env_steps, self.episodes = meta["env_steps"], meta.get("episodes", 0)
            if self.actor is not None:
                self.actor.steps = self.env_steps
            self.metrics.write("event", learner.step, env_steps=self.env_steps, event="resumed",
                               checkpoint=str(path), replay_size=self.data.size())
        if isinstance(self.data, _DeviceData):
            self.metrics.write("event", learner.step, env_steps=self.env_steps, event="dataset_loaded",
                               **self.data.loaded)
        elif self.config.regime.mode != "online" and self.data.size() == 0:
            loaded = self.builder.load_dataset(self.data.adder)
            self.data.adder.flush()
            self.metrics.write("event", learner.step, env_steps=self.env_steps, event="dataset_loaded", **loaded)
            self.data.initial_size = self.data.size()
        if self.actor is not None:
            self.actor.update_params(*learner.acting_params())
        self._tick = (time.time(), self.env_steps)

    def online_loop(self, progress: bool) -> str:
        """Env steps until `run.total_env_steps`; after each, the updates now due."""
        learner, total, actor = self.loop.learner, self.config.run.total_env_steps, self.actor
        assert actor is not None and isinstance(self.data, _InProcessReplay)
        # Updates are due from where this run (re)started; an empty table warms up again.
        base = (learner.step, self.env_steps,
                0 if self.data.ready(self.config.replay.min_size) else self.schedule.warmup)
        bar = _progress(progress, total, self.env_steps, "step")
        try:
            while self.env_steps < total:
                if actor.step():
                    self.episodes += 1
                self.env_steps += 1
                due = base[0] + self.schedule.updates_due(self.env_steps - base[1], base[2])
                while learner.step < due and self.data.ready(self.config.replay.min_size):
                    status = self.loop.step()
                    if status is not None:
                        return status
                    actor.update_params(*learner.acting_params())
                if bar is not None and self.env_steps % 100 == 0:
                    bar.set_postfix(upd=learner.step, ret=self._recent_return(), refresh=False)
                    bar.update(self.env_steps - bar.n)  # after the postfix: a line shows the newest
        finally:
            if bar is not None:
                bar.close()
        return "completed"

    def offline_loop(self, progress: bool) -> str:
        """Updates until `run.total_updates`, with no actor: fused, on the device."""
        assert isinstance(self.data, _DeviceData)
        learner, total = self.loop.learner, self.schedule.update_budget()
        bar = _progress(progress, total, learner.step, "update")
        try:
            return self.loop.run_on_device(self.data.data, total,
                                           lambda step: bar.update(step - bar.n) if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        return "completed"

    def conclude(self, status: str, start_time: float) -> Dict[str, Any]:
        """After `finish`: the final evaluation of a completed run, then its summary."""
        final_eval = self.evaluate(self.loop.learner.step) if status == "completed" else None
        extra: Dict[str, Any] = {"regime": self.config.regime.mode, "episodes": self.episodes,
                                 "train_return_last20": self.actor.stats.recent_return() if self.actor else None}
        if self.recorder is not None:
            extra["dataset"] = self.config.replay.record_to
        return finish_run(self.loop.run_dir, self.metrics, status, start_time, env_steps=self.env_steps,
                          learner_updates=self.loop.learner.step,
                          final_eval=final_eval["return_mean"] if final_eval else None, **extra)

    def finish(self, status: str) -> str:
        if self.recorder is not None:
            self.recorder.close()
        return self.loop.finish(status, self.env_steps)

    def evaluate(self, step: int) -> Optional[Dict[str, float]]:
        """An in-process evaluation (the distributed run's evaluator role)."""
        learner = self.loop.learner
        if not all_finite(learner.state.params):
            return None  # a diverging learner's parameters are never evaluated
        result = self.evaluator.run(*learner.acting_params(), episodes=self.config.run.eval_episodes)
        self.metrics.write("eval", step, env_steps=self.env_steps, **result)
        return result

    def _recent_return(self) -> str:
        recent = self.actor.stats.recent_return() if self.actor else None
        return f"{recent:.1f}" if recent is not None else "-"

    def _record_values(self) -> Dict[str, Any]:
        """What a `train` record of this run adds to the learner's values."""
        now = time.time()
        rate = (self.env_steps - self._tick[1]) / max(now - self._tick[0], 1e-9)
        self._tick = (now, self.env_steps)
        values: Dict[str, Any] = {"episodes": self.episodes}
        if self.actor is not None:
            values.update(env_steps_per_second=rate, epsilon=self.actor.epsilon(self.env_steps))
            recent = self.actor.stats.recent_return()
            if recent is not None:
                values["return"] = recent
        if self.recorder is not None:
            self.recorder.note_progress(learner_step=self.loop.learner.step, env_step=self.env_steps)
        return values


def _progress(enabled: bool, total: int, initial: int, unit: str):
    """The progress display (a bar on a terminal, lines in a file), or None with --no-progress."""
    return progress_bar(total, initial, unit) if enabled else None
