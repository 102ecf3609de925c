"""Construction of every part of a run from its config (model: Acme's `DQNBuilder`).

`eosrl train`, every role of `eosrl launch`, `eosrl evaluate` and the study
runner get their network, learner, actor, evaluator, adder, replay table,
seeds and dataset preloading here, and only wire what it returns. The rate
arithmetic lives here too (`Schedule`), so the in-process loop and the
distributed learner count updates the same way.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from eosrl.agents import checkpoint, layout, networks
from eosrl.agents.actor import Actor, Evaluator, VectorActor, linear_epsilon
from eosrl.agents.config import parse_subset
from eosrl.agents.learner import Learner
from eosrl.agents.types import Adder
from eosrl.envs.factory import env_spec, make_env
from eosrl.launch.config import Config

if TYPE_CHECKING:  # Reverb only where a table or an adder is made: the offline device path runs without it
    import reverb

    from eosrl.agents import replay

# Seed offsets: every env of a run has its own stream, all derived from run.seed.
EVALUATOR_SEED_OFFSET = 10_000
EVALUATE_COMMAND_SEED_OFFSET = 20_000


def actor_seed(seed: int, actor_id: int, start_step: int, env: int = 0, envs_per_actor: int = 1) -> int:
    """The seed of env `env` of distributed actor `actor_id`: that of the single-env actor
    actor_id·envs_per_actor + env, so N single-env actors with these seeds write what
    one actor with N envs does. A resumed share (`start_step`: env steps the actor
    already took, all its envs together) starts new streams."""
    return seed + 1000 * (actor_id * envs_per_actor + env + 1) + start_step


class Schedule:
    """When updates happen, counted the same way in one process and distributed.

    Online, the learner makes one update per `update_period` env steps once replay
    holds `min_size` transitions (a preloaded dataset counts towards them); the
    distributed replay table enforces the same ratio with its rate limiter
    (`samples_per_insert` = batch_size / update_period). Offline, the budget is
    `run.total_updates`. Periods of logs, evaluations and checkpoints count env
    steps online and updates offline; `clock_unit` converts them into updates."""

    def __init__(self, config: Config, preloaded: int):
        self.config, self.preloaded = config, preloaded
        self.offline = config.regime.mode == "offline"
        self.period = config.replay.update_period

    @property
    def samples_per_insert(self) -> float:
        return self.config.replay.batch_size / self.period

    @property
    def warmup(self) -> int:
        """Env steps before the first update: what the dataset leaves of min_size."""
        return max(0, self.config.replay.min_size - self.preloaded)

    def updates_due(self, env_steps: int, warmup: Optional[int] = None) -> int:
        """Updates the run should have made after `env_steps` (online)."""
        warmup = self.warmup if warmup is None else warmup
        return max(0, env_steps - warmup) // self.period

    def update_budget(self, start: Optional[Tuple[int, int, int]] = None) -> int:
        """Updates of the whole run; `start` = (updates, env steps, warm-up env steps still
        to come) of a resumed run."""
        if self.offline:
            return self.config.run.total_updates
        if start is None:
            return self.updates_due(self.config.run.total_env_steps)
        updates, env_steps, warmup = start
        return updates + self.updates_due(self.config.run.total_env_steps - env_steps, warmup)

    @property
    def clock_unit(self) -> int:
        """Env steps per update of the run clock (1 offline, where periods count updates)."""
        return 1 if self.offline else self.period

    def every(self, period: int) -> int:
        """A period of env steps (updates offline) in learner updates; 0 stays 0 (off)."""
        return max(1, period // self.clock_unit) if period else 0


def actor_shares(total_env_steps: int, done: int, num_actors: int) -> List[Tuple[int, int]]:
    """(start, end) env-step counters of each actor: the steps still to take, split so
    that they add up to exactly `total_env_steps - done`."""
    remaining = max(0, total_env_steps - done)
    start = done // num_actors
    return [(start, start + remaining // num_actors + (1 if i < remaining % num_actors else 0))
            for i in range(num_actors)]


class Builder:
    """Every part of a run (any agent kind), built from one config."""

    def __init__(self, config: Config):
        self.config = config
        self.spec = env_spec(config.env)
        self.network = networks.make_network(config.agent, config.env.kind,
                                             self.spec.obs_shape, self.spec.num_actions)
        self._preloaded: Optional[int] = None

    # --- replay -------------------------------------------------------------------

    @property
    def layout(self) -> layout.ItemLayout:
        return layout.ItemLayout(tuple(self.spec.frame_shape), self.spec.obs_dtype, self.spec.frame_stack,
                                 self.config.agent.n_step)

    def signature(self):
        return self.layout.signature()

    def batch_template(self, batch_size: int) -> Dict[str, np.ndarray]:
        """Zeros shaped like a batch of replay items (restoring a checkpointed batch needs it)."""
        return {key: np.zeros((batch_size,) + tuple(shape), dtype)
                for key, (shape, dtype) in self.layout.item_specs().items()}

    def preloaded_transitions(self) -> int:
        """Transitions the regime's dataset puts into replay before learning starts (0 online)."""
        if self._preloaded is None:
            self._preloaded = 0
            if self.config.regime.mode != "online":
                from eosrl.agents.dataset import DatasetReader
                reader = DatasetReader(self.config.regime.dataset, verify="none")
                self._preloaded = int(self.selection(reader).sum())
        return self._preloaded

    def schedule(self) -> Schedule:
        return Schedule(self.config, self.preloaded_transitions())

    def replay_capacity(self) -> int:
        """`replay.capacity`, raised to the dataset's size where the regime loads one:
        the whole selection must fit, or FIFO removal would drop its start."""
        if self.config.regime.mode == "online":
            return self.config.replay.capacity
        from eosrl.agents.dataset import DatasetReader
        reader = DatasetReader(self.config.regime.dataset, verify="none")
        return max(self.config.replay.capacity, reader.num_transitions)

    def make_replay_table(self, rate_limited: bool) -> reverb.Table:
        """The `replay` table. `rate_limited` (distributed): sampling waits for the whole
        dataset and min_size, then keeps samples_per_insert against new transitions (not
        offline, where no new ones come). In one process the loop itself keeps the ratio
        (`Schedule.updates_due`), so the table only waits for min_size."""
        from eosrl.agents import replay
        preloaded = self.preloaded_transitions()
        d = self.config.distributed
        limited = rate_limited and self.config.regime.mode != "offline"
        return replay.replay_table(
            self.replay_capacity(), max(self.config.replay.min_size, preloaded) if rate_limited
            else self.config.replay.min_size, self.signature(),
            samples_per_insert=self.schedule().samples_per_insert if limited else None,
            error_buffer=d.error_buffer or None)

    def make_adder(self, client: reverb.Client) -> replay.TransitionAdder:
        from eosrl.agents import replay
        return replay.TransitionAdder(client, self.config.agent.n_step, self.config.agent.discount,
                                      self.spec.frame_stack)

    def make_env_adders(self, client: reverb.Client, envs: int) -> List[replay.TransitionAdder]:
        """One adder per env of a distributed actor, sharing one Reverb writer."""
        from eosrl.agents import replay
        return replay.TransitionAdder.for_envs(client, envs, self.config.agent.n_step,
                                               self.config.agent.discount, self.spec.frame_stack)

    def load_dataset(self, adder: Adder) -> Dict[str, Any]:
        """Inserts the regime's dataset (its subset, with its corruption) through `adder`."""
        from eosrl.agents import dataset
        g, env = self.config.regime, self.config.env
        reader = dataset.DatasetReader(g.dataset)
        reader.check_env(env)
        reader.check_frames(self.spec.frame_shape, self.spec.obs_dtype)
        selection = self.selection(reader)
        corruption = None
        if g.corruption > 0:
            corruption = reader.corrupt(selection, g.corruption, g.corruption_field,
                                        seed=self.config.run.seed, num_actions=self.spec.num_actions)
        life_loss = env.kind == "atari" and env.preset == "nature"
        inserted = dataset.replay_into(reader, adder, selection=selection, corruption=corruption,
                                       clip_rewards=env.clip_rewards, life_loss_terminal=life_loss)
        return {"dataset": g.dataset, "subset": g.subset, "corruption": g.corruption,
                "corrupted": 0 if corruption is None else len(corruption.indices), **inserted}

    def selection(self, reader) -> np.ndarray:
        """The mask of the transitions `regime.subset` picks from the dataset."""
        mode, count = parse_subset(self.config.regime.subset)
        return reader.select(mode, count, seed=self.config.run.seed)

    # --- learning -----------------------------------------------------------------

    def make_learner(self) -> Learner:
        """The learner; offline, it can also run fused updates that draw their batches from
        the dataset on the device (agents/offline.py) with its own key."""
        sample_items = None
        if self.config.regime.mode == "offline":
            from eosrl.agents import offline
            batch_size = self.config.replay.batch_size
            sample_items = lambda data, key: offline.sample_items(data, key, batch_size)  # noqa: E731
        return Learner(self.network, self.config.agent, self.config.run.seed,
                       preprocess=self.layout.to_transition, sample_items=sample_items)

    def restore(self, learner: Learner, path: Path) -> Tuple[Optional[Dict[str, np.ndarray]], Dict[str, Any]]:
        """Loads checkpoint `path` into `learner`: (its fixed probe batch or None, its meta)."""
        template = {}
        if checkpoint.read_meta(path).get("has_probe_batch", False):
            template = {"probe_batch": self.batch_template(self.config.probe.batch_size)}
        extra, meta = learner.restore(path, template)
        return extra.get("probe_batch"), meta

    # --- acting -------------------------------------------------------------------

    def epsilon(self, actor_id: int = 0, num_actors: int = 1) -> Callable[[int], float]:
        """The behaviour ε of single-env actor `actor_id` of `num_actors` (with several envs
        per actor: of env i of actor a, as actor a·envs_per_actor + i of all actors' envs):
        the config's schedule, or Ape-X's fixed ε_i = apex_epsilon^(1 + apex_alpha·i/(N−1))."""
        d, a = self.config.distributed, self.config.agent
        if d.actor_epsilon == "apex":
            value = d.apex_epsilon ** (1.0 + d.apex_alpha * (actor_id / max(1, num_actors - 1)))
            return lambda step: value
        return linear_epsilon(a.epsilon_start, a.epsilon_end, a.epsilon_decay_steps)

    def make_actor(self, adder: Adder, seed: int, epsilon: Optional[Callable[[int], float]] = None,
                   recorder: Optional[Adder] = None) -> Actor:
        env = make_env(self.config.env, seed, training=True)
        return Actor(env, self.network, self.config.agent, adder, seed=seed,
                     clip_rewards=self.config.env.clip_rewards, epsilon=epsilon or self.epsilon(),
                     recorder=recorder)

    def make_vector_actor(self, adders: Sequence[Adder], actor_id: int, num_actors: int,
                          start_step: int = 0) -> VectorActor:
        """Distributed actor `actor_id`'s `distributed.envs_per_actor` envs (one per adder):
        env i is seeded (`actor_seed`) and explores (Ape-X ε over all actors' envs) as
        the single-env actor actor_id·envs_per_actor + i."""
        n = self.config.distributed.envs_per_actor
        if len(adders) != n:
            raise ValueError(f"{len(adders)} adders for distributed.envs_per_actor={n}")
        seeds = [actor_seed(self.config.run.seed, actor_id, start_step, i, n) for i in range(n)]
        envs = [make_env(self.config.env, seed, training=True) for seed in seeds]
        return VectorActor(envs, self.network, self.config.agent, adders, seeds,
                           clip_rewards=self.config.env.clip_rewards,
                           epsilons=[self.epsilon(actor_id * n + i, num_actors * n) for i in range(n)])

    def make_evaluator(self, seed_offset: int = EVALUATOR_SEED_OFFSET, render: bool = False,
                       epsilon: Optional[float] = None) -> Evaluator:
        seed = self.config.run.seed + seed_offset
        env = make_env(self.config.env, seed, training=False, render_mode="rgb_array" if render else None)
        return Evaluator(env, self.network, self.config.agent.epsilon_eval if epsilon is None else epsilon,
                         seed=seed)

