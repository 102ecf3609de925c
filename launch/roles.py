"""The processes of a distributed run, each started with the replay server's address:

  replay-server  Reverb server with the `replay` table (SampleToInsertRatio limiter)
                 and the `params` table; restores the replay snapshot paired with the
                 learner's checkpoint on resume; loads the dataset of an offline regime
  actor          its own envs (distributed.envs_per_actor, stepped together) and
                 seeds, ε-greedy, writes steps, reads `params`
  learner        the learner loop of `eosrl train` (launch/learning.py) on batches
                 from the rate-limited table; publishes params, writes checkpoints
  evaluator      reads `params`, runs evaluation episodes on a schedule
  prober         measures the probe snapshots the learner queues (`probe.mode:
                 process`, launch/prober.py) while the learner keeps learning

Every part comes from the same `Builder` (launch/builder.py) that `eosrl train`
uses; only the data path (Reverb over gRPC) and the parameter path (the
`params` table) differ. SIGTERM and Ctrl-C end every role cleanly.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import jax
import reverb

from eosrl.agents import replay
from eosrl.launch.builder import Builder, actor_shares
from eosrl.launch.config import Config
from eosrl.launch import resume
from eosrl.launch.channels import (ParamsChannel, SnapshotQueue, connect, inserted_steps,
                                   rate_limited_batches, while_server_answers)
from eosrl.launch.learning import LearnerLoop, all_finite
from eosrl.launch.lifeline import stop_on_signals
from eosrl.launch.rundir import MetricsWriter, RunDir

# The learner's exit codes, read by the launchers.
EXIT_DIVERGED = 3


def run_replay_server(config: Config, port: int, run_dir: Optional[Path]) -> None:
    """Serves the tables; on resume it first restores the replay snapshot paired with
    the learner's checkpoint (launch/resume.py), and in the offline regimes it loads the
    dataset into `replay` unless that snapshot brought it back. The learner asks for
    the snapshots; this role writes none of its own."""
    builder = Builder(config)
    checkpoint_dir = None
    if run_dir and resume.snapshots_replay(config):
        resume.prepare_replay(run_dir)
        checkpoint_dir = str(RunDir(run_dir).replay.resolve())
    tables = [builder.make_replay_table(rate_limited=True), replay.params_table()]
    if probes_in_process(config):
        tables.append(replay.probe_table(config.probe.max_queued))
    server = replay.start_server(tables, port=port, checkpoint_dir=checkpoint_dir)
    client = reverb.Client(f"localhost:{server.port}")
    print(f"replay server listening on port {server.port} of every network interface "
          f"(no authentication: see README, Security)", flush=True)
    with stop_on_signals() as signals:
        try:
            if builder.preloaded_transitions() and replay.table_size(client) == 0:
                _load_dataset(builder, client, run_dir)
            while True:
                time.sleep(1.0)
        except BaseException as error:
            if not signals.stopped(error):
                raise
        finally:
            server.stop()


def _load_dataset(builder: Builder, client: reverb.Client, run_dir: Optional[Path]) -> None:
    adder = builder.make_adder(client)
    loaded = builder.load_dataset(adder)
    adder.flush()  # closing a writer drops the items it has not sent
    adder.close()
    print(f"loaded {loaded['transitions']} transitions from {builder.config.regime.dataset}", flush=True)
    if run_dir:
        metrics = MetricsWriter(RunDir(run_dir), tensorboard=False)
        metrics.write("event", 0, env_steps=0, event="dataset_loaded", **loaded)
        metrics.close()


def replay_snapshot(client: reverb.Client) -> Optional[str]:
    """A table checkpoint written by the server (on its own node); None when the server
    cannot be reached, so the learner's checkpoint is still written, unpaired."""
    return while_server_answers(client.checkpoint)


def probes_in_process(config: Config) -> bool:
    """Whether a prober process measures this run's probes."""
    return config.probe.enabled and config.probe.mode == "process"


def run_actor(config: Config, address: str, actor_id: int, num_actors: int,
              steps: Optional[int], run_dir: Optional[Path], start_step: int = 0) -> int:
    """Steps the actor's `distributed.envs_per_actor` envs from `start_step` (a resumed
    share) until `steps` (default: this actor's share of run.total_env_steps); both
    count the env steps of all its envs. Writes an `actor` record per finished episode
    (`env`: which of its envs) and reads `params` every `param_refresh_steps` env steps."""
    builder = Builder(config)
    client = connect(address)
    if steps is None:
        steps = actor_shares(config.run.total_env_steps, 0, num_actors)[actor_id][1]
    adders = builder.make_env_adders(client, config.distributed.envs_per_actor)
    actor = builder.make_vector_actor(adders, actor_id, num_actors, start_step)
    channel = ParamsChannel(client, builder.network.init(jax.random.PRNGKey(0)))
    metrics = MetricsWriter(RunDir(run_dir), tensorboard=False) if run_dir else None
    refresh = config.distributed.param_refresh_steps
    actor.steps = start_step  # the ε schedules continue where this share stopped
    start = time.time()
    with stop_on_signals() as signals:
        try:
            params, net_state, learner_step, _ = channel.fetch()
            actor.update_params(params, net_state)
            while actor.steps < steps:
                before = actor.steps
                ended = actor.step(min(actor.num_envs, steps - actor.steps))  # the share, exactly
                if metrics is not None:
                    for env in ended:
                        stats = actor.stats[env]
                        metrics.write("actor", learner_step, actor=actor_id, env=env, env_steps=actor.steps,
                                      episode_return=stats.returns[-1], episode_length=stats.lengths[-1],
                                      epsilon=actor.epsilon(env),
                                      env_steps_per_second=(actor.steps - start_step) / (time.time() - start))
                if actor.steps // refresh > before // refresh:
                    params, net_state, learner_step, _ = channel.fetch()
                    actor.update_params(params, net_state)
            adders[0].flush()  # the adders share one writer
        except BaseException as error:
            if not signals.stopped(error):
                raise
        finally:
            for adder in adders:
                adder.close()
            if metrics is not None:
                metrics.close()
    return 0


def run_evaluator(config: Config, address: str, run_dir: Optional[Path]) -> int:
    """Evaluates whenever the learner's update count crosses a multiple of `run.eval_every`
    (in updates), as the in-process loop of `eosrl train` does; across a resume too."""
    builder = Builder(config)
    client = connect(address)
    channel = ParamsChannel(client, builder.network.init(jax.random.PRNGKey(0)))
    evaluator = builder.make_evaluator()
    metrics = MetricsWriter(RunDir(run_dir), tensorboard=False) if run_dir else None
    every = builder.schedule().every(config.run.eval_every)
    last_step = None
    with stop_on_signals() as signals:
        try:
            while every:
                params, net_state, step, env_steps = channel.fetch()
                if last_step is None:
                    last_step = step
                elif step // every > last_step // every:
                    last_step = step
                    if all_finite(params):  # the learner publishes none, but never evaluate them
                        result = evaluator.run(params, net_state, config.run.eval_episodes)
                        if metrics is not None:
                            metrics.write("eval", step, env_steps=env_steps, source="evaluator", **result)
                        print(f"eval at learner step {step}: return {result['return_mean']:.2f}", flush=True)
                time.sleep(1.0)
        except BaseException as error:
            if not signals.stopped(error):
                raise
        finally:
            if metrics is not None:
                metrics.close()
    return 0


def run_learner(config: Config, address: str, run_dir: Path, max_idle_s: float = 60.0) -> int:
    """Runs the learner loop until the run's update budget is done, or until no new data
    has arrived for `max_idle_s` (every actor has finished). Returns 0, or EXIT_DIVERGED
    once the loss went non-finite (no later state is published or saved)."""
    builder = Builder(config)
    client = connect(address)
    rdir = RunDir(run_dir).create()
    metrics = MetricsWriter(rdir)
    preloaded = builder.preloaded_transitions()
    offset = resume.env_step_offset(run_dir)  # before this run's first checkpoint changes it

    def env_steps() -> int:
        return inserted_steps(client, preloaded) + offset

    template = builder.network.init(jax.random.PRNGKey(0))
    channel = ParamsChannel(client, template)
    probe_queue = SnapshotQueue(client, template, config.probe.max_queued) if probes_in_process(config) else None
    batches = rate_limited_batches(address, config.replay.batch_size, lambda: inserted_steps(client), max_idle_s)
    loop = LearnerLoop(builder, rdir, metrics, batches, env_steps=env_steps,
                       sample_items=lambda n: replay.sample_items(client, n, builder.signature()),
                       snapshot=(lambda: replay_snapshot(client)) if resume.snapshots_replay(config) else None,
                       publish=channel.publish, probe_queue=probe_queue)
    learner, schedule = loop.learner, builder.schedule()
    target = schedule.update_budget()
    restored = loop.restore()
    if restored is not None:
        # An empty table (no paired snapshot) has to fill to min_size again before sampling.
        warmup = schedule.warmup if offset else 0
        target = schedule.update_budget(start=(learner.step, loop.last_env_steps, warmup))
        metrics.write("event", learner.step, event="resumed", checkpoint=str(restored[0]),
                      env_steps=env_steps(), update_target=target, replay_size=replay.table_size(client))
    channel.publish(*learner.acting_params(), learner.step, env_steps())
    status = "completed"
    with stop_on_signals() as signals:
        try:
            while learner.step < target and status == "completed":
                status = loop.step() or status
        except BaseException as error:
            status = "interrupted" if signals.stopped(error) else "failed"
            if status == "failed":
                raise
        finally:
            status = _finish_learner(loop, status, env_steps, channel, probe_queue)
            metrics.close()
            batches.close()
    return EXIT_DIVERGED if status == "diverged" else 0


def _finish_learner(loop: LearnerLoop, status: str, env_steps, channel: ParamsChannel,
                    probe_queue: Optional[SnapshotQueue]) -> str:
    """The checkpoint first: it needs the replay server only for its snapshot, which may
    be gone when this runs because the launcher was killed. Then the prober is told
    that no snapshot will follow those queued."""
    final_env_steps = while_server_answers(env_steps)
    status = loop.finish(status, loop.last_env_steps if final_env_steps is None else final_env_steps)
    step = loop.learner.step
    print(f"learner finished at update {step}: {status}", flush=True)
    if status != "diverged":  # never hand non-finite parameters to actors or the evaluator
        while_server_answers(lambda: channel.publish(*loop.learner.acting_params(), step, loop.last_env_steps))
    if probe_queue is not None:
        while_server_answers(probe_queue.close)
    return status
