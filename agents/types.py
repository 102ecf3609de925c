"""The contracts between the parts: what a learner consumes (`Transition`), what it
holds (`LearnerState`), and what an actor writes to (`Adder`).

Both the Reverb `TransitionAdder` (agents/replay.py) and the on-disk
`DatasetWriter` (agents/dataset/) implement `Adder`, so an actor hands every
env step to either under the same names.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import numpy as np
import optax

Params = Any  # a haiku parameter tree
NetState = Any  # spectral-norm power-iteration vectors ({} without SN)


class Transition(NamedTuple):
    """A batch of n-step transitions, as the learner's loss sees it."""
    obs: jax.Array          # [B, *obs_shape] observation at t
    action: jax.Array       # [B] int32
    reward: jax.Array       # [B] n-step return r_t + γ r_{t+1} + ...
    discount: jax.Array     # [B] γ^m (0 after a terminal) for bootstrapping from next_obs
    next_obs: jax.Array     # [B, *obs_shape] observation at t + m


class LearnerState(NamedTuple):
    params: Params
    target_params: Params
    net_state: NetState          # SN vectors of the online network
    target_net_state: NetState
    opt_state: optax.OptState
    step: jax.Array              # learner updates done, int32 scalar
    rng: jax.Array               # PRNG key


class Adder(Protocol):
    """Takes an actor's env steps: `add_first` after a reset, `add` after each step."""

    def add_first(self, obs: np.ndarray) -> None: ...

    def add(self, action: int, reward: float, terminated: bool, truncated: bool, next_obs: np.ndarray,
            life_loss: bool = False) -> None: ...
