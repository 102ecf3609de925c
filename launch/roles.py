"""The processes of a distributed run, each started with the replay server's address:

  replay-server  Reverb server with the `replay` table (SampleToInsertRatio limiter)
                 and the `params` table; loads the dataset of an offline regime;
                 checkpoints on a schedule and at shutdown
  actor          its own env and seed, ε-greedy, writes steps, reads `params`
  learner        prefetching batch stream, updates, publishes params, metrics, checkpoints
  evaluator      reads `params`, runs evaluation episodes on a schedule

Each role is the same Actor / Learner / Evaluator class `eosrl train` uses in
one process; only the data path (Reverb over gRPC) and the parameter path
(the `params` table) differ. SIGTERM and Ctrl-C end every role cleanly: the
learner writes a final checkpoint, the replay server a final table checkpoint.
"""
from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import reverb  # noqa: E402

from agents import replay  # noqa: E402
from agents.actor import Actor, Evaluator, linear_epsilon  # noqa: E402
from agents.config import Config  # noqa: E402
from envs.factory import make_env  # noqa: E402
from launch.rundir import MetricsWriter, RunDir  # noqa: E402
from launch.learning import LearningLoop  # noqa: E402
from launch.train import (Components, load_dataset_into_replay, preloaded_transitions,  # noqa: E402
                          prune_replay_checkpoints, replay_capacity)


class Stop(Exception):
    """Raised by SIGTERM/SIGINT handlers so every role unwinds through its `finally`."""


def _install_stop_handlers() -> None:
    def handler(signum, frame):
        raise Stop()
    try:
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
    except ValueError:
        pass  # not the main thread (a Ray worker): the launcher stops this role instead


def samples_per_insert(config: Config) -> float:
    return config.replay.batch_size / config.replay.update_period


def clock_unit(config: Config) -> int:
    """Env steps per run-clock tick for the learner and evaluator schedules: the
    offline regime counts `log_every`, `eval_every`, ... in learner updates, the
    others in env steps (an update every `update_period` of them)."""
    return 1 if config.regime.mode == "offline" else config.replay.update_period


def update_budget(config: Config, preloaded: int) -> int:
    """Learner updates of the whole run, as `eosrl train` counts them: `total_updates`
    offline; otherwise one per `update_period` env steps once replay holds `min_size`
    transitions (a preloaded dataset counts towards them)."""
    if config.regime.mode == "offline":
        return config.run.total_updates
    warmup = max(0, config.replay.min_size - preloaded)
    return max(0, config.run.total_env_steps - warmup) // config.replay.update_period


def connect(address: str, timeout_s: float = 60.0) -> reverb.Client:
    """A client once the server answers (roles may start before the server is up)."""
    client = reverb.Client(address)
    deadline = time.time() + timeout_s
    while True:
        try:
            client.server_info(timeout=5)
            return client
        except Exception:
            if time.time() > deadline:
                raise ConnectionError(f"--replay {address}: no Reverb server answered within {timeout_s:.0f} s")
            time.sleep(0.5)


def inserted_steps(client: reverb.Client, preloaded: int = 0) -> int:
    """Actor env steps so far: transitions inserted into `replay` (one per actor env
    step) less the `preloaded` ones a dataset put there."""
    info = client.server_info()[replay.REPLAY_TABLE]
    return max(0, int(info.rate_limiter_info.insert_stats.completed) - preloaded)


# ----------------------------------------------------------------------------
# The params table: the learner's latest parameters as one item.


class ParamsChannel:
    def __init__(self, client: reverb.Client, template: Any):
        self._client = client
        self._treedef = jax.tree_util.tree_structure(template)

    def publish(self, params, net_state, step: int) -> None:
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves((params, net_state))]
        self._client.insert(leaves + [np.asarray(step, np.int64)], priorities={replay.PARAMS_TABLE: 1.0})

    def fetch(self):
        """(params, net_state, learner step); waits until the learner has published once."""
        while self._client.server_info()[replay.PARAMS_TABLE].current_size == 0:
            time.sleep(0.2)  # polling keeps SIGTERM deliverable, unlike a blocking sample
        sample = next(self._client.sample(replay.PARAMS_TABLE, num_samples=1, emit_timesteps=False))
        flat = [x[0] for x in sample.data]  # an inserted item is one step: drop that axis
        params, net_state = jax.tree_util.tree_unflatten(self._treedef, flat[:-1])
        return params, net_state, int(flat[-1])


# ----------------------------------------------------------------------------
# Roles.


def run_replay_server(config: Config, port: int, run_dir: Optional[Path]) -> None:
    """Serves the tables; in the offline regimes it first loads the dataset into
    `replay` (unless a table checkpoint brought it back)."""
    _install_stop_handlers()
    parts = Components(config)
    d = config.distributed
    preloaded = preloaded_transitions(config)
    # Sampling waits for the whole dataset (and min_size); online and offline-to-online
    # keep samples_per_insert against new transitions from that point on.
    table = replay.replay_table(replay_capacity(config), max(config.replay.min_size, preloaded),
                                parts.signature(),
                                samples_per_insert=None if config.regime.mode == "offline"
                                else samples_per_insert(config),
                                error_buffer=d.error_buffer or None)
    checkpoint_dir = str(RunDir(run_dir).replay) if (run_dir and config.replay.checkpoint) else None
    server = replay.start_server([table, replay.params_table()], port=port, checkpoint_dir=checkpoint_dir)
    client = reverb.Client(f"localhost:{server.port}")
    print(f"replay server listening on port {server.port}", flush=True)
    last = time.time()
    try:
        if preloaded and replay.table_size(client) == 0:
            adder = replay.TransitionAdder(client, config.agent.n_step, config.agent.discount,
                                           parts.spec.frame_stack)
            loaded = load_dataset_into_replay(config, adder, parts.spec)
            adder.close()
            print(f"loaded {loaded['transitions']} transitions from {config.regime.dataset}", flush=True)
            if run_dir:
                metrics = MetricsWriter(RunDir(run_dir), tensorboard=False)
                metrics.write("event", 0, env_steps=0, event="dataset_loaded", **loaded)
                metrics.close()
        while True:
            time.sleep(1.0)
            if checkpoint_dir and time.time() - last >= d.replay_checkpoint_seconds:
                checkpoint_replay(client, Path(checkpoint_dir))
                last = time.time()
    except Stop:
        pass
    finally:
        if checkpoint_dir:
            checkpoint_replay(client, Path(checkpoint_dir))
        server.stop()


def checkpoint_replay(client: reverb.Client, directory: Path) -> None:
    """A table checkpoint, written by the server on its own node; older ones are
    pruned where `directory` is visible from here (a launcher may run elsewhere)."""
    saved = client.checkpoint()
    if directory.is_dir():
        prune_replay_checkpoints(directory, saved)


def actor_epsilon(config: Config, actor_id: int, num_actors: int):
    d, a = config.distributed, config.agent
    if d.actor_epsilon == "apex":
        exponent = 1.0 + d.apex_alpha * (actor_id / max(1, num_actors - 1))
        value = d.apex_epsilon ** exponent
        return lambda step: value
    return linear_epsilon(a.epsilon_start, a.epsilon_end, a.epsilon_decay_steps)


def run_actor(config: Config, address: str, actor_id: int, num_actors: int,
              steps: Optional[int], run_dir: Optional[Path], start_step: int = 0) -> int:
    """Steps the env from `start_step` (a resumed share) until `steps` (default:
    this actor's share of run.total_env_steps)."""
    _install_stop_handlers()
    parts = Components(config)
    client = connect(address)
    seed = config.run.seed + 1000 * (actor_id + 1) + start_step
    steps = steps if steps is not None else math.ceil(config.run.total_env_steps / num_actors)
    adder = replay.TransitionAdder(client, config.agent.n_step, config.agent.discount,
                                   parts.spec.frame_stack, max_in_flight_items=64)
    actor = Actor(make_env(config.env, seed, training=True), parts.network, config.agent, adder,
                  seed=seed, clip_rewards=config.env.clip_rewards,
                  epsilon=actor_epsilon(config, actor_id, num_actors))
    channel = ParamsChannel(client, parts.network.init(jax.random.PRNGKey(0)))
    metrics = MetricsWriter(RunDir(run_dir), tensorboard=False) if run_dir else None
    params, net_state, learner_step = channel.fetch()
    actor.update_params(params, net_state)
    actor.steps = start_step  # the ε schedule continues where this share stopped
    start, start_steps = time.time(), start_step
    try:
        while actor.steps < steps:
            if actor.step() and metrics is not None:
                metrics.write("actor", learner_step, actor=actor_id, env_steps=actor.steps,
                              episode_return=actor.stats.returns[-1],
                              episode_length=actor.stats.lengths[-1],
                              epsilon=actor.epsilon(actor.steps),
                              env_steps_per_second=(actor.steps - start_steps) / (time.time() - start))
            if actor.steps % config.distributed.param_refresh_steps == 0:
                params, net_state, learner_step = channel.fetch()
                actor.update_params(params, net_state)
        adder.flush()
    except Stop:
        pass
    finally:
        adder.close()
        if metrics is not None:
            metrics.close()
    return 0


def run_evaluator(config: Config, address: str, run_dir: Optional[Path]) -> int:
    """Evaluates whenever the learner has advanced `run.eval_every` env steps' worth of updates."""
    _install_stop_handlers()
    parts = Components(config)
    client = connect(address)
    channel = ParamsChannel(client, parts.network.init(jax.random.PRNGKey(0)))
    evaluator = Evaluator(make_env(config.env, config.run.seed + 10_000, training=False),
                          parts.network, config.agent.epsilon_eval, seed=config.run.seed + 10_000)
    metrics = MetricsWriter(RunDir(run_dir), tensorboard=False) if run_dir else None
    every_updates = max(1, config.run.eval_every // clock_unit(config)) if config.run.eval_every else None
    preloaded = preloaded_transitions(config)
    last_step = None
    try:
        while every_updates is not None:
            params, net_state, step = channel.fetch()
            if step > 0 and (last_step is None or step - last_step >= every_updates):
                last_step = step
                result = evaluator.run(params, net_state, config.run.eval_episodes)
                if metrics is not None:
                    metrics.write("eval", step, env_steps=inserted_steps(client, preloaded), source="evaluator",
                                  **result)
                print(f"eval at learner step {step}: return {result['return_mean']:.2f}", flush=True)
            time.sleep(1.0)
    except Stop:
        pass
    finally:
        if metrics is not None:
            metrics.close()
    return 0


def run_learner(config: Config, address: str, run_dir: Path, max_idle_s: float = 60.0) -> int:
    """Updates until the run's `update_budget` is done, or until no new data has
    arrived for `max_idle_s` (every actor has finished)."""
    _install_stop_handlers()
    parts = Components(config)
    client = connect(address)
    rdir = RunDir(run_dir).create()
    metrics = MetricsWriter(rdir)
    preloaded = preloaded_transitions(config)

    def env_steps() -> int:
        return inserted_steps(client, preloaded)

    loop = LearningLoop(parts, metrics, env_steps=env_steps,
                        sample_items=lambda n: replay.sample_items(client, n, parts.signature()))
    learner = loop.learner
    restored = loop.restore(rdir.checkpoints)
    if restored is not None:
        metrics.write("event", learner.step, event="resumed", checkpoint=str(restored[0]),
                      env_steps=env_steps(),
                      replay_size=client.server_info()[replay.REPLAY_TABLE].current_size)
    channel = ParamsChannel(client, learner.acting_params())
    channel.publish(*learner.acting_params(), learner.step)

    rcfg, run = config.replay, config.run
    target = update_budget(config, preloaded)
    log_every = max(1, run.log_every // clock_unit(config))
    checkpoint_every = max(1, run.checkpoint_every // clock_unit(config))
    timeout_ms = 5000

    def new_stream():
        return replay.batch_stream(address, rcfg.batch_size, rate_limiter_timeout_ms=timeout_ms)

    def save() -> None:
        loop.save(rdir.checkpoints, meta={"env_steps": env_steps()})

    stream = new_stream()
    status = "completed"
    tick, tick_step = time.time(), learner.step
    last_inserts, last_change = inserted_steps(client), time.time()
    try:
        while learner.step < target:
            try:
                batch = next(stream)
            except StopIteration:
                # The rate limiter held sampling back for the stream's timeout. Short
                # timeouts keep SIGTERM deliverable; data that stopped arriving for
                # max_idle_s means every actor has finished.
                inserts = inserted_steps(client)
                if inserts != last_inserts:
                    last_inserts, last_change = inserts, time.time()
                elif time.time() - last_change > max_idle_s:
                    status = "no_more_data"
                    break
                stream.close()
                stream = new_stream()
                continue
            loop.update(batch)
            step = learner.step
            if step % config.distributed.publish_every == 0:
                channel.publish(*learner.acting_params(), step)
            if step % log_every == 0:
                now = time.time()
                rate = (step - tick_step) / max(now - tick, 1e-9)
                tick, tick_step = now, step
                if not loop.write_train({"env_steps": env_steps(), "updates_per_second": rate}):
                    status = "diverged"
                    break
            if step % checkpoint_every == 0:
                save()
    except Stop:
        status = "interrupted"
    finally:
        stream.close()
        channel.publish(*learner.acting_params(), learner.step)
        save()
        metrics.write("event", learner.step, event="learner_finished", status=status,
                      env_steps=env_steps())
        metrics.close()
    return 0 if status in ("completed", "no_more_data", "interrupted") else 1
