"""Acting: the ε-greedy policy, the actors that feed replay, and the evaluator.

Acting applies the network with `update_sn=False`, so spectral-norm power
iteration vectors never advance outside the learner.

`Actor` steps one env (`eosrl train`); `VectorActor`, the distributed actor,
steps its N envs (`distributed.envs_per_actor`) together, with at most one
jitted network call on the batch of their observations per step (`EpsilonGreedy`:
exploration is drawn on the host, per env, and a step on which every env explores
calls no network). Each env keeps its own seed, exploration generator, adder, ε and
episode bookkeeping (`_EnvStream`, shared with `Actor`), so env i of a vector
actor writes exactly what a single-env actor with its seed would (builder.py,
`actor_seed`). The envs are a plain list stepped in a loop, not gymnasium's
vector API: measured with 8 MinAtar Breakout envs, the loop with its np.stack
of the observations took 12.4 µs per env step, `SyncVectorEnv` 16 µs
(autoreset on the next step, whose action it ignores, so the adder would have
to skip that step) or 22 µs (autoreset in the same step, the final observation
in `info`), merging every step's infos into arrays; a process per env
(`AsyncVectorEnv`) would add a pipe round trip per step to a ~6 µs env on
cores the actor already shares with XLA, Reverb's threads and the server.
What costs time is the network call and Reverb's
writer (benchmarks/README.md, note 4).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eosrl.agents import networks
from eosrl.agents.config import AgentConfig


def linear_epsilon(start: float, end: float, decay_steps: int) -> Callable[[int], float]:
    def epsilon(step: int) -> float:
        if decay_steps <= 0:
            return end
        fraction = min(1.0, step / decay_steps)
        return start + fraction * (end - start)
    return epsilon


def make_greedy(network: networks.Network):
    """Jitted greedy actions for a batch: (params, net_state, obs [B, ...]) -> actions [B]."""

    def greedy(params, net_state, obs):
        out, _ = network.apply(params, net_state, obs, False)
        return jnp.argmax(network.agent_kind.q_values(out), axis=-1)

    return jax.jit(greedy)


class EpsilonGreedy:
    """ε-greedy actions for N envs, each exploring with its own seed.

    Env i draws its exploration on the host from a numpy generator seeded with its
    seed: with probability ε_i a uniform random action, otherwise the network's
    greedy one. The jitted network runs only when some env acts greedily, once for
    the batch of all N observations, so a step on which every env explores costs no
    network call; with one env and ε near 1 early in training that is most steps
    (Dopamine acts this way; a network call is ~38 % of a single-env actor's step,
    benchmarks/README.md note 2). The draws of env i depend only on its seed and
    ε, so env i of N acts as a single-env policy with its seed does.
    """

    def __init__(self, network: networks.Network, seeds: Sequence[int]):
        self._greedy = make_greedy(network)  # compiled at its first call
        self.num_actions = network.num_actions
        self.reseed(seeds)

    def reseed(self, seeds: Sequence[int]) -> None:
        self._rngs = [np.random.default_rng(seed) for seed in seeds]

    def __call__(self, params, net_state, observations: Sequence[np.ndarray],
                 epsilons: Sequence[float]) -> List[int]:
        """Actions of the first len(observations) envs (each with its ε). A shorter list
        (the end of a share) pads the batch with its first observation, so the network
        keeps one compiled shape."""
        actions: List[Optional[int]] = [
            int(rng.integers(self.num_actions)) if rng.random() < epsilon else None
            for rng, epsilon in zip(self._rngs, epsilons)]
        if any(action is None for action in actions):
            batch = list(observations) + [observations[0]] * (len(self._rngs) - len(observations))
            greedy = np.asarray(self._greedy(params, net_state, np.stack(batch))).tolist()
            actions = [greedy[i] if action is None else action for i, action in enumerate(actions)]
        return actions  # type: ignore[return-value]


class EpisodeStats:
    """Raw (unclipped) returns and lengths of finished episodes."""

    def __init__(self) -> None:
        self.returns: List[float] = []
        self.lengths: List[int] = []
        self._return = 0.0
        self._length = 0

    def step(self, reward: float) -> None:
        self._return += reward
        self._length += 1

    def end(self) -> None:
        self.returns.append(self._return)
        self.lengths.append(self._length)
        self._return, self._length = 0.0, 0

    def recent_return(self, n: int = 20) -> Optional[float]:
        return float(np.mean(self.returns[-n:])) if self.returns else None


class _EnvStream:
    """One env's side of acting: its resets, its steps with the action it is given, the
    adder (and recorder) it hands every step to, and its episode stats."""

    def __init__(self, env, adder, clip_rewards: bool, recorder=None):
        self.env = env
        self.adder = adder
        self.recorder = recorder  # a DatasetWriter: raw rewards and flags, not the adder's view
        self.clip_rewards = clip_rewards
        self.stats = EpisodeStats()
        self.obs = None  # None between an episode's end and the next reset

    def observation(self, seed: Optional[int]):
        """The current observation; resets first when no episode is running, seeded
        with `seed` (callers pass it only before their first step: later resets
        continue the env's own RNG stream)."""
        if self.obs is None:
            self.obs, _ = self.env.reset(seed=seed)
            self.adder.add_first(self.obs)
            if self.recorder is not None:
                self.recorder.add_first(self.obs)
        return self.obs

    def step(self, action: int) -> bool:
        """One env step with `action`; returns True when it ended the episode."""
        next_obs, reward, terminated, truncated, info = self.env.step(action)
        self.stats.step(float(reward))
        train_reward = float(np.clip(reward, -1.0, 1.0)) if self.clip_rewards else float(reward)
        life_loss = bool(info.get("life_loss", False))  # reported under the Nature preset only
        self.adder.add(action, train_reward, terminated, truncated, next_obs, life_loss)
        if self.recorder is not None:  # the dataset keeps the raw reward
            self.recorder.add(action, float(reward), terminated, truncated, next_obs, life_loss)
        episode_over = terminated or truncated
        self.obs = None if episode_over else next_obs
        if episode_over:
            self.stats.end()
        return episode_over


class Actor:
    """Steps one env with the ε-greedy policy and hands every step to `adder`.

    The actor owns its env and episode bookkeeping; parameters are pushed in
    with `update_params` (in-process) or pulled from the `params` table by the
    distributed actor process.
    """

    def __init__(self, env, network: networks.Network, agent: AgentConfig, adder,
                 seed: int, clip_rewards: bool, epsilon: Optional[Callable[[int], float]] = None,
                 recorder=None):
        self._stream = _EnvStream(env, adder, clip_rewards, recorder)
        self.epsilon = epsilon or linear_epsilon(agent.epsilon_start, agent.epsilon_end,
                                                 agent.epsilon_decay_steps)
        self._policy = EpsilonGreedy(network, [seed])
        self._seed = seed
        self.params = None
        self.net_state = None
        self.stats = self._stream.stats
        self.steps = 0

    def update_params(self, params, net_state) -> None:
        self.params, self.net_state = params, net_state

    def step(self) -> bool:
        """One env step; returns True when it ended an episode."""
        obs = self._stream.observation(self._seed if self.steps == 0 else None)
        [action] = self._policy(self.params, self.net_state, [obs], [self.epsilon(self.steps)])
        self.steps += 1
        return self._stream.step(action)


class VectorActor:
    """Steps N envs together: one jitted ε-greedy call on the batch of their observations,
    then each env with its action, handing its steps to its own adder.

    Env i has its own seed (its first reset and its exploration key), adder and ε
    schedule, evaluated at its own step count: the envs step together, so after
    `steps` env steps in all each has taken steps // N. `step(count)` steps only the
    first `count` envs (the end of a share that is not a multiple of N).
    """

    def __init__(self, envs: Sequence, network: networks.Network, agent: AgentConfig, adders: Sequence,
                 seeds: Sequence[int], clip_rewards: bool,
                 epsilons: Optional[Sequence[Callable[[int], float]]] = None):
        if not len(envs) == len(adders) == len(seeds) >= 1 or (epsilons is not None and len(epsilons) != len(envs)):
            raise ValueError(f"{len(envs)} envs, {len(adders)} adders, {len(seeds)} seeds"
                             + ("" if epsilons is None else f", {len(epsilons)} ε schedules"))
        self.streams = [_EnvStream(env, adder, clip_rewards) for env, adder in zip(envs, adders)]
        self.epsilons = list(epsilons) if epsilons is not None else [
            linear_epsilon(agent.epsilon_start, agent.epsilon_end, agent.epsilon_decay_steps)] * len(envs)
        self._policy = EpsilonGreedy(network, seeds)
        self._seeds = list(seeds)
        self.stats = [stream.stats for stream in self.streams]  # env i's episodes
        self.params = None
        self.net_state = None
        self.steps = 0

    @property
    def num_envs(self) -> int:
        return len(self.streams)

    def update_params(self, params, net_state) -> None:
        self.params, self.net_state = params, net_state

    def epsilon(self, env: int) -> float:
        """Env `env`'s current ε (its schedule at its own step count)."""
        return self.epsilons[env](self.steps // self.num_envs)

    def step(self, count: Optional[int] = None) -> List[int]:
        """One step of each of the first `count` envs (default all); returns the indices
        of the envs whose episode it ended."""
        count = self.num_envs if count is None else count
        first = self.steps == 0
        observations = [stream.observation(seed if first else None)
                        for stream, seed in zip(self.streams[:count], self._seeds)]
        t = self.steps // self.num_envs
        actions = self._policy(self.params, self.net_state, observations,
                               [epsilon(t) for epsilon in self.epsilons[:count]])
        self.steps += count
        return [i for i in range(count) if self.streams[i].step(actions[i])]


class Evaluator:
    """Runs evaluation episodes with ε-greedy(`epsilon`) on its own env."""

    def __init__(self, env, network: networks.Network, epsilon: float, seed: int):
        self.env = env
        self.epsilon = epsilon
        self.seed = seed
        self._policy = EpsilonGreedy(network, [seed])
        self._episodes_run = 0

    def run(self, params, net_state, episodes: int, frames: Optional[list] = None) -> Dict[str, float]:
        """Returns return statistics; with `frames`, the first episode's renders are appended."""
        self._policy.reseed([self.seed + self._episodes_run])
        returns, lengths = [], []
        start = time.time()
        for episode in range(episodes):
            # Every evaluation sees new episodes, reproducibly from the seed.
            obs, _ = self.env.reset(seed=self.seed + self._episodes_run)
            self._episodes_run += 1
            total, length, done = 0.0, 0, False
            while not done:
                if frames is not None and episode == 0:
                    frames.append(self.env.render())
                [action] = self._policy(params, net_state, [obs], [self.epsilon])
                obs, reward, terminated, truncated, _ = self.env.step(action)
                total += float(reward)
                length += 1
                done = terminated or truncated
            returns.append(total)
            lengths.append(length)
        returns_np = np.asarray(returns)
        return {
            "return_mean": float(returns_np.mean()),
            "return_median": float(np.median(returns_np)),
            "return_std": float(returns_np.std()),
            "return_min": float(returns_np.min()),
            "return_max": float(returns_np.max()),
            "episode_length_mean": float(np.mean(lengths)),
            "episodes": episodes,
            "seconds": time.time() - start,
        }
