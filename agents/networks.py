"""Value networks in haiku: an MLP, the MinAtar CNN and the Nature CNN, with the head
of the agent kind (agents/kinds.py): Q-values (DQN), logits on atoms (C51), quantiles
(QR-DQN).

Every weight layer has a stable name (`conv_0`, ..., `dense_0`, ..., `head`)
so spectral normalisation and the probes can address layers by name or by
negative index, as Gogianu et al. (2021) do ("-2" is the penultimate layer).
Networks are `hk.transform_with_state` functions: the state holds the power
iteration vectors of spectrally normalised layers (empty without SN).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from eosrl.agents.config import AgentConfig
from eosrl.agents import kinds, spectral_norm
from eosrl.agents.layers import layer_names, resolve_network


class Network(NamedTuple):
    """A pure network: `init(rng, obs) -> (params, state)`,
    `apply(params, state, obs, update_sn) -> (output, new_state)`.

    `output` is [B, *agent_kind.head_shape(num_actions)]: Q-values [B, A] (DQN),
    logits [B, A, atoms] (C51), quantiles [B, A, N] (QR-DQN); `agent_kind.q_values(output)`
    gives the Q-values [B, A] and `agent_kind.loss` the TD loss on outputs.
    `layer_names` lists the weight layers from input to output.
    """
    init: Callable
    apply: Callable
    layer_names: Tuple[str, ...]
    num_actions: int
    agent_kind: kinds.AgentKind


def _torso_spec(network: str, hidden_sizes: Sequence[int]):
    """(conv layers as (channels, kernel, stride), dense widths) of each network."""
    if network == "mlp":
        return [], list(hidden_sizes)
    if network == "minatar_cnn":  # Young & Tian (2019): conv 16 3x3 stride 1, dense 128.
        return [(16, 3, 1)], [128]
    if network == "nature_cnn":  # Mnih et al. (2015).
        return [(32, 8, 4), (64, 4, 2), (64, 3, 1)], [512]
    raise ValueError(f"agent.network: unknown network {network!r}")


def make_network(agent: AgentConfig, env_kind: str, obs_shape: Sequence[int],
                 num_actions: int) -> Network:
    network = resolve_network(agent, env_kind)
    convs, denses = _torso_spec(network, agent.hidden_sizes)
    names = layer_names(network, agent.hidden_sizes)
    sn = spectral_norm.LayerSelector(agent.spectral_norm, names)
    agent_kind = kinds.make(agent)
    head_shape = agent_kind.head_shape(num_actions)
    # Small-scale init on the head keeps initial Q-values near zero (as in DQN Zoo).
    w_init = hk.initializers.VarianceScaling(1.0, "fan_avg", "uniform")

    def forward(obs: jnp.ndarray, update_sn: bool = False) -> jnp.ndarray:
        x = obs.astype(jnp.float32)
        if obs.dtype == jnp.uint8:
            x = x / 255.0
        for i, (channels, kernel, stride) in enumerate(convs):
            x = sn.conv(f"conv_{i}", channels, kernel, stride, w_init, update_sn)(x)
            x = jax.nn.relu(x)
        x = hk.Flatten()(x)
        for i, width in enumerate(denses):
            x = sn.linear(f"dense_{i}", width, w_init, update_sn)(x)
            x = jax.nn.relu(x)
        out = sn.linear("head", math.prod(head_shape), w_init, update_sn)(x)
        return out.reshape(out.shape[:-1] + head_shape)

    transformed: Any = hk.without_apply_rng(hk.transform_with_state(forward))
    dummy = np.zeros((1,) + tuple(obs_shape), np.float32)

    def init(rng):
        return transformed.init(rng, jnp.asarray(dummy))

    return Network(init=init, apply=transformed.apply, layer_names=tuple(names),
                   num_actions=num_actions, agent_kind=agent_kind)
