"""The agent kinds and their registry: `agent.kind` names the module that owns an agent's
network head, TD loss and greedy Q-values (the `AgentKind` contract), made from the
agent's fields of the config. The network, learner, actors and probes ask that object,
never the name (models: Acme's `LossFn` protocol, DQN Zoo's per-agent modules).

Adding an agent (docs/design.md, "Agents"): a module in agents/ with
`make(agent: AgentConfig) -> AgentKind`, its name and module in `REGISTRY`, its fields in
`AgentConfig` (agents/config.py), a preset in configs/ and tests.

The registry holds module names, imported on first use: agents/config.py checks
`agent.kind` against it when a config is read, and reading a config must not import
JAX (0.4 s against 20 s on the shared 2-core machine).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, Protocol, Tuple

if TYPE_CHECKING:
    import jax

REGISTRY: Dict[str, str] = {
    "dqn": "eosrl.agents.dqn",
    "c51": "eosrl.agents.c51",
    "qrdqn": "eosrl.agents.qrdqn",
}


class AgentKind(Protocol):
    """What the rest of eosrl needs of an agent kind. Outputs are batched: [B, *head_shape]."""

    def head_shape(self, num_actions: int) -> Tuple[int, ...]:
        """The network's output for one observation: [A] (DQN), [A, atoms] (C51), [A, N] (QR-DQN)."""
        ...

    def q_values(self, output: jax.Array) -> jax.Array:
        """Q-values [B, A] of an output; their argmax is the greedy action."""
        ...

    def loss(self, out_tm1: jax.Array, a_tm1: jax.Array, r_t: jax.Array, discount_t: jax.Array,
             out_t_target: jax.Array, q_t_selector: jax.Array) -> jax.Array:
        """The TD loss, a mean over the batch. `discount_t` is γ^m·(1 − terminal) of an m-step
        return; the bootstrap action is the argmax of `q_t_selector` [B, A] (the target
        network's Q-values, or the online network's for double Q-learning), valued by
        `out_t_target`."""
        ...

    def loss_diagnostics(self, out_tm1: jax.Array, a_tm1: jax.Array, r_t: jax.Array, discount_t: jax.Array,
                         out_t_target: jax.Array, q_t_selector: jax.Array) -> Dict[str, jax.Array]:
        """Scalars the probes record about the loss on a batch (the arguments of `loss`), by
        record field: DQN and QR-DQN `huber_fraction`, the fraction of TD errors beyond
        Huber's δ (κ), where the loss is linear and has no curvature; {} for C51."""
        ...


def make(agent: Any) -> AgentKind:
    """The kind of `agent` (a validated AgentConfig), with its settings."""
    return importlib.import_module(REGISTRY[agent.kind]).make(agent)
