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

import os
import signal
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple

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
from launch import resume  # noqa: E402
from launch.learning import all_finite  # noqa: E402
from launch.train import (Components, load_dataset_into_replay, preloaded_transitions,  # noqa: E402
                          replay_capacity)


# The learner's exit codes, read by the launchers.
EXIT_FAILED = 1
EXIT_DIVERGED = 3


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


def update_budget(config: Config, preloaded: int, start: Optional[tuple] = None) -> int:
    """Learner updates of the whole run, as `eosrl train` counts them: `total_updates`
    offline; otherwise one per `update_period` env steps once replay holds `min_size`
    transitions (a preloaded dataset counts towards them). `start` = (updates, env steps,
    warm-up env steps still to come) of a resumed run."""
    if config.regime.mode == "offline":
        return config.run.total_updates
    if start is not None:
        updates, env_steps, warmup = start
        return updates + max(0, config.run.total_env_steps - env_steps - warmup) // config.replay.update_period
    warmup = max(0, config.replay.min_size - preloaded)
    return max(0, config.run.total_env_steps - warmup) // config.replay.update_period


def actor_shares(total_env_steps: int, done: int, num_actors: int) -> List[Tuple[int, int]]:
    """(start, end) env-step counters of each actor: the steps still to take, split so
    that they add up to exactly `total_env_steps - done`."""
    remaining = max(0, total_env_steps - done)
    start = done // num_actors
    return [(start, start + remaining // num_actors + (1 if i < remaining % num_actors else 0))
            for i in range(num_actors)]


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
    info = client.server_info(timeout=3)[replay.REPLAY_TABLE]
    return max(0, int(info.rate_limiter_info.insert_stats.completed) - preloaded)


# ----------------------------------------------------------------------------
# The params table: the learner's latest parameters as one item.


class ParamsChannel:
    """The learner's latest acting parameters with its update and env-step counts."""

    def __init__(self, client: reverb.Client, template: Any):
        self._client = client
        self._treedef = jax.tree_util.tree_structure(template)

    def publish(self, params, net_state, step: int, env_steps: int) -> None:
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves((params, net_state))]
        self._client.insert(leaves + [np.asarray(step, np.int64), np.asarray(env_steps, np.int64)],
                            priorities={replay.PARAMS_TABLE: 1.0})

    def fetch(self):
        """(params, net_state, learner step, env steps); waits until the learner has published once."""
        while self._client.server_info()[replay.PARAMS_TABLE].current_size == 0:
            time.sleep(0.2)  # polling keeps SIGTERM deliverable, unlike a blocking sample
        sample = next(self._client.sample(replay.PARAMS_TABLE, num_samples=1, emit_timesteps=False))
        flat = [x[0] for x in sample.data]  # an inserted item is one step: drop that axis
        params, net_state = jax.tree_util.tree_unflatten(self._treedef, flat[:-2])
        return params, net_state, int(flat[-2]), int(flat[-1])


# ----------------------------------------------------------------------------
# Roles.


def run_replay_server(config: Config, port: int, run_dir: Optional[Path]) -> None:
    """Serves the tables; on resume it first restores the replay snapshot paired with
    the learner's checkpoint (launch/resume.py), and in the offline regimes it loads the
    dataset into `replay` unless that snapshot brought it back. The learner asks for
    the snapshots; this role writes none of its own."""
    _install_stop_handlers()
    parts = Components(config)
    preloaded = preloaded_transitions(config)
    # Sampling waits for the whole dataset (and min_size); online and offline-to-online
    # keep samples_per_insert against new transitions from that point on.
    table = replay.replay_table(replay_capacity(config), max(config.replay.min_size, preloaded),
                                parts.signature(),
                                samples_per_insert=None if config.regime.mode == "offline"
                                else samples_per_insert(config),
                                error_buffer=config.distributed.error_buffer or None)
    checkpoint_dir = None
    if run_dir and resume.snapshots_replay(config):
        resume.prepare_replay(run_dir)
        checkpoint_dir = str(RunDir(run_dir).replay.resolve())
    server = replay.start_server([table, replay.params_table()], port=port, checkpoint_dir=checkpoint_dir)
    client = reverb.Client(f"localhost:{server.port}")
    print(f"replay server listening on port {server.port} of every network interface "
          f"(no authentication: see README, Security)", flush=True)
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
    except Stop:
        pass
    finally:
        server.stop()


def replay_snapshot(client: reverb.Client) -> Optional[str]:
    """A table checkpoint written by the server (on its own node); None when the server
    cannot be reached, so the learner's checkpoint is still written, unpaired."""
    try:
        return client.checkpoint()
    except Exception as e:  # noqa: BLE001 - a dead server is reported by the launcher
        print(f"replay snapshot failed ({e}); the checkpoint is written without one", flush=True)
        return None


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
    if steps is None:
        steps = actor_shares(config.run.total_env_steps, 0, num_actors)[actor_id][1]
    adder = replay.TransitionAdder(client, config.agent.n_step, config.agent.discount,
                                   parts.spec.frame_stack)
    actor = Actor(make_env(config.env, seed, training=True), parts.network, config.agent, adder,
                  seed=seed, clip_rewards=config.env.clip_rewards,
                  epsilon=actor_epsilon(config, actor_id, num_actors))
    channel = ParamsChannel(client, parts.network.init(jax.random.PRNGKey(0)))
    metrics = MetricsWriter(RunDir(run_dir), tensorboard=False) if run_dir else None
    params, net_state, learner_step, _ = channel.fetch()
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
                params, net_state, learner_step, _ = channel.fetch()
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
    last_step = None  # the schedule keeps its multiples of every_updates across a resume
    try:
        while every_updates is not None:
            params, net_state, step, env_steps = channel.fetch()
            if last_step is None:
                last_step = step
            elif step // every_updates > last_step // every_updates:
                last_step = step
                if all_finite(params):  # the learner publishes none, but never evaluate them
                    result = evaluator.run(params, net_state, config.run.eval_episodes)
                    if metrics is not None:
                        metrics.write("eval", step, env_steps=env_steps, source="evaluator", **result)
                    print(f"eval at learner step {step}: return {result['return_mean']:.2f}", flush=True)
                else:
                    print(f"skipped the evaluation at learner step {step}: non-finite parameters", flush=True)
            time.sleep(1.0)
    except Stop:
        pass
    finally:
        if metrics is not None:
            metrics.close()
    return 0


def run_learner(config: Config, address: str, run_dir: Path, max_idle_s: float = 60.0) -> int:
    """Updates until the run's update budget is done, or until no new data has
    arrived for `max_idle_s` (every actor has finished). Returns 0, or
    EXIT_DIVERGED once the loss went non-finite (no later state is published or saved)."""
    _install_stop_handlers()
    parts = Components(config)
    client = connect(address)
    rdir = RunDir(run_dir).create()
    metrics = MetricsWriter(rdir)
    preloaded = preloaded_transitions(config)
    offset = resume.env_step_offset(run_dir)  # before this run's first checkpoint changes it

    def env_steps() -> int:
        return inserted_steps(client, preloaded) + offset

    loop = LearningLoop(parts, metrics, env_steps=env_steps,
                        sample_items=lambda n: replay.sample_items(client, n, parts.signature()))
    learner = loop.learner
    restored = loop.restore(rdir.checkpoints)
    target = update_budget(config, preloaded)
    if restored is not None:
        meta = restored[1]
        # An empty table (no paired snapshot) has to fill to min_size again before sampling.
        warmup = max(0, config.replay.min_size - preloaded) if offset else 0
        target = update_budget(config, preloaded, start=(learner.step, int(meta.get("env_steps", 0)), warmup))
        metrics.write("event", learner.step, event="resumed", checkpoint=str(restored[0]),
                      env_steps=env_steps(), update_target=target,
                      replay_size=client.server_info()[replay.REPLAY_TABLE].current_size)
    channel = ParamsChannel(client, learner.acting_params())
    channel.publish(*learner.acting_params(), learner.step, env_steps())

    run = config.run
    log_every = max(1, run.log_every // clock_unit(config))
    checkpoint_every = max(1, run.checkpoint_every // clock_unit(config))
    snapshot = (lambda: replay_snapshot(client)) if resume.snapshots_replay(config) else None

    def log() -> None:
        nonlocal tick, tick_step
        now = time.time()
        rate = (learner.step - tick_step) / max(now - tick, 1e-9)
        tick, tick_step = now, learner.step
        loop.write_train({"env_steps": env_steps(), "updates_per_second": rate})

    stream = _LearnerStream(address, config.replay.batch_size, lambda: inserted_steps(client), max_idle_s)
    status = "completed"
    tick, tick_step = time.time(), learner.step
    try:
        while learner.step < target:
            batch = stream.next()
            if batch is None:
                status = "no_more_data"
                break
            if not loop.update(batch):
                status = "diverged"
                break
            step = learner.step
            if step % config.distributed.publish_every == 0:
                channel.publish(*learner.acting_params(), step, env_steps())
            if step % log_every == 0:
                log()
            if step % checkpoint_every == 0:
                loop.save(rdir.checkpoints, meta={"env_steps": env_steps()}, replay_checkpoint=snapshot)
        if status != "diverged" and not loop.finish():
            status = "diverged"
    except Stop:
        status = "interrupted" if loop.finish() else "diverged"
    finally:
        # The checkpoint first: it needs the replay server only for its snapshot, which
        # may be gone when this runs because the launcher was killed.
        if status == "diverged":
            log()  # the window with the non-finite loss
        final_env_steps = _while_server_answers(env_steps)
        if final_env_steps is None:  # the server is gone: its count ended with the last record
            final_env_steps = loop.last_env_steps
        loop.save(rdir.checkpoints, meta={"env_steps": final_env_steps}, replay_checkpoint=snapshot)
        metrics.write("event", learner.step, event="learner_finished", status=status,
                      env_steps=final_env_steps, diverged_at=loop.diverged_at)
        metrics.close()
        print(f"learner finished at update {learner.step}: {status}", flush=True)
        if status != "diverged":  # never hand non-finite parameters to actors or the evaluator
            _while_server_answers(lambda: channel.publish(*learner.acting_params(), learner.step,
                                                          final_env_steps))
        stream.close()
    if status == "diverged":
        return EXIT_DIVERGED
    return 0


def _while_server_answers(call):
    """`call()`, or None when the replay server cannot be reached (it may be gone at shutdown)."""
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - gRPC errors of a dead server come in several types
        print(f"replay server unreachable at shutdown ({type(e).__name__}: {e})", flush=True)
        return None


class _LearnerStream:
    """Training batches; None once no new data has arrived for `max_idle_s`.

    The rate limiter holds sampling back for the stream's short timeout, which keeps
    SIGTERM deliverable; the stream is then reopened. Data that stopped arriving for
    max_idle_s means every actor has finished."""

    def __init__(self, address: str, batch_size: int, inserts, max_idle_s: float, timeout_ms: int = 5000):
        self._open = lambda: replay.batch_stream(address, batch_size, rate_limiter_timeout_ms=timeout_ms)
        self._inserts, self._max_idle_s = inserts, max_idle_s
        self._stream = self._open()
        self._last_inserts, self._last_change = inserts(), time.time()

    def next(self):
        while True:
            try:
                return next(self._stream)
            except StopIteration:
                inserts = self._inserts()
                if inserts != self._last_inserts:
                    self._last_inserts, self._last_change = inserts, time.time()
                elif time.time() - self._last_change > self._max_idle_s:
                    return None
                self._stream.close()
                self._stream = self._open()

    def close(self) -> None:
        self._stream.close()
