"""`eosrl train`: actor, learner and evaluator in one process around an
in-process Reverb server. The plain loop: act, write to replay, and every
`update_period` env steps (once `min_size` transitions are in) draw a batch
and update. Used for debugging, tests and small studies; `eosrl launch` runs
the same classes as separate processes.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import reverb  # noqa: E402

from agents import checkpoint, networks, replay  # noqa: E402
from agents.actor import Actor, Evaluator  # noqa: E402
from agents.config import Config, load_config, save_config  # noqa: E402
from agents.learner import Learner  # noqa: E402
from envs.factory import env_spec, make_env  # noqa: E402
from launch.rundir import MetricsWriter, RunDir, sigterm_as_interrupt  # noqa: E402


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


def all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree)
               if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating))


def prune_replay_checkpoints(directory: Path, keep_path: str) -> None:
    for child in directory.iterdir():
        if child.is_dir() and str(child) != str(Path(keep_path)):
            shutil.rmtree(child, ignore_errors=True)


def train(config: Config, run_path: str | Path, resume: bool = False,
          progress: bool = True) -> Dict[str, Any]:
    """Runs (or resumes) a single-process training run; returns the summary."""
    start_time = time.time()
    run_dir = RunDir(run_path).create()
    if not resume:
        save_config(config, run_dir.config)
    parts = Components(config)
    agent, rcfg, run = config.agent, config.replay, config.run

    server = replay.start_server(
        [replay.replay_table(rcfg.capacity, rcfg.min_size, parts.signature())],
        checkpoint_dir=str(run_dir.replay) if rcfg.checkpoint else None)
    client = reverb.Client(f"localhost:{server.port}")
    adder = replay.TransitionAdder(client, agent.n_step, agent.discount, parts.spec.frame_stack)
    learner = parts.learner()
    prober = None
    if config.probe.enabled:
        from agents.probes import Prober  # compiles HVPs: only load when asked for
        prober = Prober(config.probe, learner)
    actor = Actor(make_env(config.env, run.seed, training=True), parts.network, agent, adder,
                  seed=run.seed, clip_rewards=config.env.clip_rewards)
    evaluator = Evaluator(make_env(config.env, run.seed + 10_000, training=False), parts.network,
                          agent.epsilon_eval, seed=run.seed + 10_000)
    metrics = MetricsWriter(run_dir)

    env_steps, episodes = 0, 0
    probe_batch = None  # the fixed probe batch (raw items), drawn once when learning starts
    if resume:
        path = checkpoint.latest(run_dir.checkpoints)
        if path is None:
            raise FileNotFoundError(f"{run_dir.checkpoints}: no checkpoint to resume from")
        has_probe_batch = checkpoint.read_meta(path).get("has_probe_batch", False)
        extra_template = {"probe_batch": parts.batch_template(config.probe.batch_size)} if has_probe_batch else {}
        extra, meta = learner.restore(path, extra_template)
        env_steps, episodes = meta["env_steps"], meta["episodes"]
        actor.steps = env_steps
        probe_batch = extra.get("probe_batch")
        metrics.write("event", learner.step, env_steps=env_steps, event="resumed",
                      checkpoint=str(path), replay_size=replay.table_size(client))
    actor.update_params(*learner.acting_params())

    initial_size = replay.table_size(client)
    learning = False
    window: List[Dict[str, Any]] = []
    last_log, last_eval, last_ckpt = env_steps, env_steps, env_steps
    eval_result: Optional[Dict[str, float]] = None
    status = "completed"
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=run.total_env_steps, initial=env_steps, unit="step", dynamic_ncols=True)
    tick, tick_steps = time.time(), env_steps

    def save_checkpoint() -> Optional[Path]:
        if not all_finite(learner.state.params):
            metrics.write("event", learner.step, env_steps=env_steps, event="checkpoint_skipped",
                          reason="non-finite parameters; the last good checkpoint is kept")
            return None
        if rcfg.checkpoint:
            adder.flush()
            saved = client.checkpoint()
            prune_replay_checkpoints(run_dir.replay, saved)
        keep_batch = probe_batch is not None and config.probe.batch == "fixed"
        extra = {"probe_batch": probe_batch} if keep_batch else {}
        return learner.save(run_dir.checkpoints, keep=run.keep_checkpoints, extra=extra,
                            meta={"env_steps": env_steps, "episodes": episodes,
                                  "learner_step": learner.step, "has_probe_batch": bool(extra)})

    def run_eval() -> Dict[str, float]:
        result = evaluator.run(*learner.acting_params(), episodes=run.eval_episodes)
        metrics.write("eval", learner.step, env_steps=env_steps, **result)
        return result

    try:
        with sigterm_as_interrupt():
            while env_steps < run.total_env_steps:
                if actor.step():
                    episodes += 1
                env_steps += 1
                if not learning and initial_size + adder.items_written >= rcfg.min_size:
                    adder.flush()  # the server must hold min_size items before sampling starts
                    stream = replay.batch_stream(f"localhost:{server.port}", rcfg.batch_size)
                    learning = True
                    if prober and config.probe.batch == "fixed" and probe_batch is None:
                        probe_batch = replay.sample_items(client, config.probe.batch_size, parts.signature())
                if learning and env_steps % rcfg.update_period == 0:
                    window.append(learner.update(next(stream)))
                    actor.update_params(*learner.acting_params())
                    if prober and prober.should_probe(learner.step):
                        if config.probe.batch == "fresh":
                            probe_batch = replay.sample_items(client, config.probe.batch_size, parts.signature())
                        record = prober.probe(learner.preprocess(probe_batch))
                        metrics.write("probe", learner.step, env_steps=env_steps,
                                      **{k: v for k, v in record.items() if k not in ("kind", "step")})

                if env_steps - last_log >= run.log_every or env_steps == run.total_env_steps:
                    last_log = env_steps
                    now = time.time()
                    sps = (env_steps - tick_steps) / max(now - tick, 1e-9)
                    tick, tick_steps = now, env_steps
                    values: Dict[str, Any] = {"env_steps": env_steps, "episodes": episodes,
                                              "epsilon": actor.epsilon(env_steps),
                                              "env_steps_per_second": sps}
                    recent = actor.stats.recent_return()
                    if recent is not None:
                        values["return"] = recent
                    if window:
                        stacked = jax.device_get(window)
                        for key in stacked[0]:
                            values[key] = float(np.mean([m[key] for m in stacked]))
                        values["lr"] = learner.current_lr()
                        window = []
                        if not math.isfinite(values["loss"]):
                            metrics.write("train", learner.step, **values)
                            metrics.write("event", learner.step, env_steps=env_steps,
                                          event="divergence", reason="non-finite loss")
                            status = "diverged"
                            break
                    metrics.write("train", learner.step, **values)
                    if bar is not None:
                        bar.set_postfix(sps=f"{sps:.0f}", ret=f"{recent:.1f}" if recent is not None else "-",
                                        upd=learner.step, refresh=False)
                if bar is not None and env_steps % 100 == 0:
                    bar.update(env_steps - bar.n)
                if run.eval_every and env_steps - last_eval >= run.eval_every:
                    last_eval = env_steps
                    eval_result = run_eval()
                if env_steps - last_ckpt >= run.checkpoint_every:
                    last_ckpt = env_steps
                    save_checkpoint()
    except KeyboardInterrupt:
        status = "interrupted"
        metrics.write("event", learner.step, env_steps=env_steps, event="interrupted")
    finally:
        if bar is not None:
            bar.update(env_steps - bar.n)
            bar.close()

    if status == "completed":
        eval_result = run_eval()
    checkpoint_path = save_checkpoint()
    wall = time.time() - start_time
    summary = {
        "status": status,
        "run_dir": str(run_dir.path),
        "env_steps": env_steps,
        "learner_updates": learner.step,
        "episodes": episodes,
        "final_eval_return": eval_result["return_mean"] if eval_result else None,
        "train_return_last20": actor.stats.recent_return(),
        "checkpoint": str(checkpoint_path) if checkpoint_path else None,
        "wall_seconds": round(wall, 1),
    }
    metrics.write("event", learner.step, event="finished", **summary)
    metrics.close()
    adder.close()
    server.stop()
    return summary

