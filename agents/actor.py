"""Acting: the ε-greedy policy, the actor that feeds replay, and the evaluator.

Acting applies the network with `update_sn=False`, so spectral-norm power
iteration vectors never advance outside the learner.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

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


def make_policy(network: networks.Network):
    """Jitted ε-greedy action for one observation:
    (params, net_state, obs, rng, ε) -> (action, next rng). The key is split
    inside the jitted call because a host-side split costs as much as the policy."""

    def policy(params, net_state, obs, rng, epsilon):
        out, _ = network.apply(params, net_state, obs[None], False)
        greedy = jnp.argmax(networks.q_values(network, out)[0])
        next_rng, explore_rng, action_rng = jax.random.split(rng, 3)
        random_action = jax.random.randint(action_rng, (), 0, network.num_actions)
        explore = jax.random.uniform(explore_rng) < epsilon
        return jnp.where(explore, random_action, greedy), next_rng

    return jax.jit(policy)


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


class Actor:
    """Steps one env with the ε-greedy policy and hands every step to `adder`.

    The actor owns its env and episode bookkeeping; parameters are pushed in
    with `update_params` (in-process) or pulled from the `params` table by the
    distributed actor process.
    """

    def __init__(self, env, network: networks.Network, agent: AgentConfig, adder,
                 seed: int, clip_rewards: bool, epsilon: Optional[Callable[[int], float]] = None,
                 recorder=None):
        self.env = env
        self.adder = adder
        self.recorder = recorder  # a DatasetWriter: raw rewards and flags, not the adder's view
        self.clip_rewards = clip_rewards
        self.epsilon = epsilon or linear_epsilon(agent.epsilon_start, agent.epsilon_end,
                                                 agent.epsilon_decay_steps)
        self._policy = make_policy(network)
        self._rng = jax.random.PRNGKey(seed)
        self._seed = seed
        self.params = None
        self.net_state = None
        self.stats = EpisodeStats()
        self.steps = 0
        self._obs = None

    def update_params(self, params, net_state) -> None:
        self.params, self.net_state = params, net_state

    def _reset(self) -> None:
        # Seed only the first reset: later resets continue the env's own RNG stream.
        seed = self._seed if self._obs is None and self.steps == 0 else None
        self._obs, _ = self.env.reset(seed=seed)
        self.adder.add_first(self._obs)
        if self.recorder is not None:
            self.recorder.add_first(self._obs)

    def step(self) -> bool:
        """One env step; returns True when it ended an episode."""
        if self._obs is None:
            self._reset()
        action, self._rng = self._policy(self.params, self.net_state, self._obs, self._rng,
                                         self.epsilon(self.steps))
        action = int(action)
        next_obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        self.stats.step(float(reward))
        train_reward = float(np.clip(reward, -1.0, 1.0)) if self.clip_rewards else float(reward)
        life_loss = bool(info.get("life_loss", False))  # reported under the Nature preset only
        self.adder.add(action, train_reward, terminated, truncated, next_obs, life_loss)
        if self.recorder is not None:  # the dataset keeps the raw reward
            self.recorder.add(action, float(reward), terminated, truncated, next_obs, life_loss)
        episode_over = terminated or truncated
        self._obs = next_obs
        if episode_over:
            self.stats.end()
            self._obs = None
        return episode_over


class Evaluator:
    """Runs evaluation episodes with ε-greedy(`epsilon`) on its own env."""

    def __init__(self, env, network: networks.Network, epsilon: float, seed: int):
        self.env = env
        self.epsilon = epsilon
        self.seed = seed
        self._policy = make_policy(network)
        self._episodes_run = 0

    def run(self, params, net_state, episodes: int, frames: Optional[list] = None) -> Dict[str, float]:
        """Returns return statistics; with `frames`, the first episode's renders are appended."""
        rng = jax.random.PRNGKey(self.seed + self._episodes_run)
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
                action, rng = self._policy(params, net_state, obs, rng, self.epsilon)
                action = int(action)
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
