"""The agent kinds behind one interface (agents/kinds.py): every registered kind makes a
network whose head, greedy Q-values and loss fit together; an unknown kind is refused
with one line naming the registered ones; QR-DQN's quantile midpoints and Q-values."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CONFIGS
from eosrl.agents import kinds, networks
from eosrl.agents.config import AgentConfig, ConfigError
from eosrl.launch.config import load_config
from eosrl.agents.learner import make_loss_fn
from eosrl.agents.types import Transition


def test_registry_names_the_kinds_and_their_modules():
    assert list(kinds.REGISTRY) == ["dqn", "c51", "qrdqn"]
    for name, module in kinds.REGISTRY.items():
        assert callable(importlib.import_module(module).make), name


@pytest.mark.parametrize("kind,shape", [("dqn", (3,)), ("c51", (3, 5)), ("qrdqn", (3, 7))])
def test_each_kind_owns_its_head_q_values_and_loss(kind, shape):
    """Breaks if a kind's output is not [B, *head_shape], its Q-values not [B, A] or its loss
    (through the learner's loss function) not a finite scalar."""
    agent = AgentConfig(kind=kind, network="mlp", hidden_sizes=[4], num_atoms=5, num_quantiles=7)
    network = networks.make_network(agent, "gym", (2,), 3)
    assert network.agent_kind.head_shape(3) == shape
    params, state = network.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch = Transition(obs=rng.normal(size=(6, 2)).astype(np.float32), action=rng.integers(0, 3, 6),
                       reward=rng.normal(size=6).astype(np.float32), discount=np.full(6, 0.9, np.float32),
                       next_obs=rng.normal(size=(6, 2)).astype(np.float32))
    out, _ = network.apply(params, state, batch.obs, False)
    assert out.shape == (6,) + shape
    assert network.agent_kind.q_values(out).shape == (6, 3)
    loss, (_, mean_q) = make_loss_fn(network, agent)(params, params, state, state, batch)
    assert loss.shape == () and np.isfinite(float(loss)) and np.isfinite(float(mean_q))


def test_unknown_kind_is_one_line_naming_the_registered_kinds():
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "dqn_cartpole.yaml", ["agent.kind=ppo"])
    message = str(err.value)
    assert "\n" not in message
    assert "agent.kind: unknown kind 'ppo' (registered: dqn, c51, qrdqn)" in message


def test_qrdqn_quantile_midpoints_and_q_values():
    kind = kinds.make(AgentConfig(kind="qrdqn", num_quantiles=4))
    np.testing.assert_allclose(kind.tau, [1 / 8, 3 / 8, 5 / 8, 7 / 8])
    quantiles = jnp.array([[[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 0.0]]])
    np.testing.assert_allclose(kind.q_values(quantiles), [[3.0, 0.0]])
