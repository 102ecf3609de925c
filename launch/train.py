"""`eosrl train`: actor, learner and evaluator in one process around an
in-process Reverb server. The plain loop: act, write to replay, and every
`update_period` env steps (once `min_size` transitions are in) draw a batch
and update. Used for debugging, tests and small studies; `eosrl launch` runs
the same classes as separate processes.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import reverb  # noqa: E402

from agents import checkpoint, networks, replay  # noqa: E402
from agents.actor import Actor, Evaluator  # noqa: E402
from agents.config import Config, save_config  # noqa: E402
from agents.learner import Learner  # noqa: E402
from envs.factory import EnvSpec, env_spec, make_env  # noqa: E402
from launch import resume as resume_lib  # noqa: E402
from launch.learning import LearningLoop, all_finite  # noqa: E402
from launch.rundir import MetricsWriter, RunDir, interrupt_on_stop_signals  # noqa: E402


class Components:
    """Everything a run needs, built from a config (shared by train, evaluate and the roles)."""

    def __init__(self, config: Config):
        self.config = config
        self.spec = env_spec(config.env)
        self.network = networks.make_network(config.agent, config.env.kind,
                                             self.spec.obs_shape, self.spec.num_actions)

    def learner(self) -> Learner:
        return Learner(self.network, self.config.agent, self.config.run.seed,
                       preprocess=replay.item_to_transition(self.spec.frame_stack))

    def signature(self):
        return replay.item_signature(self.spec.frame_shape, self.spec.obs_dtype, self.spec.frame_stack)

    def batch_template(self, batch_size: int) -> Dict[str, np.ndarray]:
        """Zeros shaped like a batch of replay items (restoring a checkpointed batch needs it)."""
        return {key: np.zeros((batch_size,) + tuple(spec.shape), spec.dtype.as_numpy_dtype)
                for key, spec in self.signature().items()}

    def restore(self, learner: Learner, path: Path) -> Tuple[Optional[Dict[str, np.ndarray]], Dict[str, Any]]:
        """Loads checkpoint `path` into `learner`: (its fixed probe batch or None, its meta)."""
        template = {}
        if checkpoint.read_meta(path).get("has_probe_batch", False):
            template = {"probe_batch": self.batch_template(self.config.probe.batch_size)}
        extra, meta = learner.restore(path, template)
        return extra.get("probe_batch"), meta


def _selection(config: Config, reader) -> np.ndarray:
    """The mask of the transitions `regime.subset` picks from the dataset."""
    from agents.config import parse_subset
    mode, count = parse_subset(config.regime.subset)
    return reader.select(mode, count, seed=config.run.seed)


def preloaded_transitions(config: Config) -> int:
    """Transitions the regime's dataset puts into replay before learning starts (0 online)."""
    if config.regime.mode == "online":
        return 0
    from agents.dataset import DatasetReader
    return int(_selection(config, DatasetReader(config.regime.dataset, verify="none")).sum())


def replay_capacity(config: Config) -> int:
    """`replay.capacity`, raised to the dataset's size where the regime loads one:
    the whole selection must fit, or FIFO removal would drop its start."""
    if config.regime.mode == "online":
        return config.replay.capacity
    from agents.dataset import DatasetReader
    return max(config.replay.capacity, DatasetReader(config.regime.dataset, verify="none").num_transitions)


def load_dataset_into_replay(config: Config, adder: replay.TransitionAdder, spec: EnvSpec) -> Dict[str, Any]:
    """Inserts the regime's dataset (its subset, with its corruption) into replay."""
    from agents import dataset
    g = config.regime
    reader = dataset.DatasetReader(g.dataset)
    reader.check_env(config.env)
    reader.check_frames(spec.frame_shape, spec.obs_dtype)
    selection = _selection(config, reader)
    corruption = None
    if g.corruption > 0:
        corruption = reader.corrupt(selection, g.corruption, g.corruption_field,
                                    seed=config.run.seed, num_actions=spec.num_actions)
    life_loss = config.env.kind == "atari" and config.env.preset == "nature"
    inserted = dataset.replay_into(reader, adder, selection=selection, corruption=corruption,
                                   clip_rewards=config.env.clip_rewards, life_loss_terminal=life_loss)
    adder.flush()
    return {"dataset": g.dataset, "subset": g.subset, "corruption": g.corruption,
            "corrupted": 0 if corruption is None else len(corruption.indices), **inserted}


def train(config: Config, run_path: str | Path, resume: bool = False,
          progress: bool = True) -> Dict[str, Any]:
    """Runs (or resumes) a single-process run in any regime; returns the summary.

    Online regimes are clocked by env steps (an update every `update_period`
    steps once `min_size` items are in); the offline regime by learner
    updates. Both share one learning step, so the learner cannot tell them apart.
    """
    start_time = time.time()
    run_dir = RunDir(run_path).create()
    if not resume:
        save_config(config, run_dir.config)
    parts = Components(config)
    agent, rcfg, run, regime = config.agent, config.replay, config.run, config.regime
    offline = regime.mode == "offline"

    snapshots = resume_lib.snapshots_replay(config)
    if snapshots:
        resume_lib.prepare_replay(run_dir.path)  # only the snapshot paired with the checkpoint stays
    server = replay.start_server(
        [replay.replay_table(replay_capacity(config), rcfg.min_size, parts.signature())],
        checkpoint_dir=str(run_dir.replay.resolve()) if snapshots else None)
    client = reverb.Client(f"localhost:{server.port}")
    adder = replay.TransitionAdder(client, agent.n_step, agent.discount, parts.spec.frame_stack)
    recorder = None
    if rcfg.record_to and not offline:
        from agents.dataset import DatasetWriter
        recorder = DatasetWriter.for_env(rcfg.record_to, config.env, resume=resume,
                                         agent={"kind": agent.kind, "run": str(run_dir.path)})
    metrics = MetricsWriter(run_dir)
    env_steps, episodes = 0, 0
    loop = LearningLoop(parts, metrics, env_steps=lambda: env_steps,
                        sample_items=lambda n: replay.sample_items(client, n, parts.signature()))
    learner = loop.learner
    actor = Actor(make_env(config.env, run.seed, training=True), parts.network, agent, adder,
                  seed=run.seed, clip_rewards=config.env.clip_rewards, recorder=recorder)
    evaluator = Evaluator(make_env(config.env, run.seed + 10_000, training=False), parts.network,
                          agent.epsilon_eval, seed=run.seed + 10_000)

    if resume:
        restored = loop.restore(run_dir.checkpoints)
        if restored is None:
            raise FileNotFoundError(f"{run_dir.checkpoints}: no checkpoint to resume from")
        path, meta = restored
        env_steps, episodes = meta["env_steps"], meta["episodes"]
        actor.steps = env_steps
        metrics.write("event", learner.step, env_steps=env_steps, event="resumed",
                      checkpoint=str(path), replay_size=replay.table_size(client))
    if regime.mode != "online" and replay.table_size(client) == 0:
        loaded = load_dataset_into_replay(config, adder, parts.spec)
        metrics.write("event", learner.step, env_steps=env_steps, event="dataset_loaded", **loaded)
    actor.update_params(*learner.acting_params())

    initial_size = replay.table_size(client)
    stream = None
    # The run's clock: env steps online, learner updates offline.
    clock = (lambda: learner.step) if offline else (lambda: env_steps)
    total = run.total_updates if offline else run.total_env_steps
    last_log = last_eval = last_ckpt = clock()
    eval_result: Optional[Dict[str, float]] = None
    status = "completed"
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=clock(), unit="update" if offline else "step", dynamic_ncols=True)
    tick, tick_clock = time.time(), clock()

    def snapshot() -> str:
        adder.flush()
        return client.checkpoint()

    def save_checkpoint() -> Optional[Path]:
        return loop.save(run_dir.checkpoints, meta={"env_steps": env_steps, "episodes": episodes},
                         replay_checkpoint=snapshot if snapshots else None)

    def run_eval() -> Optional[Dict[str, float]]:
        if not all_finite(learner.state.params):
            return None  # a diverging learner's parameters are never evaluated
        result = evaluator.run(*learner.acting_params(), episodes=run.eval_episodes)
        metrics.write("eval", learner.step, env_steps=env_steps, **result)
        return result

    def learn() -> bool:
        """One update; False once the loss has gone non-finite."""
        nonlocal stream
        if stream is None:
            adder.flush()  # the server must hold min_size items before sampling starts
            stream = replay.batch_stream(f"localhost:{server.port}", rcfg.batch_size)
        if not loop.update(next(stream)):
            return False
        actor.update_params(*learner.acting_params())
        return True

    def log() -> None:
        """Writes a `train` record."""
        nonlocal tick, tick_clock
        now = time.time()
        rate = (clock() - tick_clock) / max(now - tick, 1e-9)
        tick, tick_clock = now, clock()
        values: Dict[str, Any] = {"env_steps": env_steps, "episodes": episodes,
                                  ("updates_per_second" if offline else "env_steps_per_second"): rate}
        if not offline:
            values["epsilon"] = actor.epsilon(env_steps)
        recent = actor.stats.recent_return()
        if recent is not None:
            values["return"] = recent
        loop.write_train(values)
        if bar is not None:
            bar.set_postfix(rate=f"{rate:.0f}/s", ret=f"{recent:.1f}" if recent is not None else "-",
                            upd=learner.step, refresh=False)
        if recorder is not None:
            recorder.note_progress(learner_step=learner.step, env_step=env_steps)

    try:
        with interrupt_on_stop_signals():
            while clock() < total:
                if offline:
                    finite = learn()
                else:
                    if actor.step():
                        episodes += 1
                    env_steps += 1
                    ready = stream is not None or initial_size + adder.items_written >= rcfg.min_size
                    finite = not (ready and env_steps % rcfg.update_period == 0) or learn()
                if not finite:
                    status = "diverged"
                    log()  # the window with the non-finite loss
                    break
                now = clock()
                if (now - last_log >= run.log_every or now == total):
                    last_log = now
                    log()
                if bar is not None and now % 100 == 0:
                    bar.update(now - bar.n)
                # Schedules fire at multiples of their period, also across a resume.
                if run.eval_every and now // run.eval_every > last_eval // run.eval_every:
                    last_eval = now
                    eval_result = run_eval()
                if now // run.checkpoint_every > last_ckpt // run.checkpoint_every:
                    last_ckpt = now
                    save_checkpoint()
            if status == "completed" and not loop.finish():
                status = "diverged"
    except KeyboardInterrupt:
        status = "interrupted"
        metrics.write("event", learner.step, env_steps=env_steps, event="interrupted")
    finally:
        if bar is not None:
            bar.update(clock() - bar.n)
            bar.close()
        if recorder is not None:
            recorder.close()

    if status == "completed":
        eval_result = run_eval()
    elif status == "diverged":
        eval_result = None  # an earlier evaluation is not the result of this run
    checkpoint_path = save_checkpoint()
    wall = time.time() - start_time
    summary = {
        "status": status,
        "run_dir": str(run_dir.path),
        "regime": regime.mode,
        "env_steps": env_steps,
        "learner_updates": learner.step,
        "episodes": episodes,
        "final_eval_return": eval_result["return_mean"] if eval_result else None,
        "train_return_last20": actor.stats.recent_return(),
        "checkpoint": str(checkpoint_path) if checkpoint_path else None,
        "wall_seconds": round(wall, 1),
    }
    if status == "diverged":
        latest = checkpoint.latest(run_dir.checkpoints)
        summary["message"] = (f"the learner diverged: the TD loss became non-finite at update {loop.diverged_at}; "
                              + (f"the last good checkpoint is {latest}" if latest else
                                 "no checkpoint was written before it"))
    if recorder is not None:
        summary["dataset"] = rcfg.record_to
    metrics.write("event", learner.step, event="finished", **summary)
    metrics.close()
    if stream is not None:
        stream.close()
    adder.close()
    server.stop()
    return summary
