"""Optimisers from the config, built from optax, and their learning-rate schedule."""
from __future__ import annotations

import jax
import optax

from eosrl.agents.config import OptimizerConfig
from eosrl.agents.step_sizes import scale_by_step_size


def learning_rate(config: OptimizerConfig, lr: float | jax.Array | None = None):
    """The schedule as a function of the update count (a float for `constant`). `lr` in
    place of `config.lr`: a traced scalar where runs of different step sizes share one
    vmapped program (agents/seeds.py)."""
    lr = config.lr if lr is None else lr
    if config.lr_schedule == "linear":
        return optax.linear_schedule(lr, config.lr_end, config.lr_decay_updates)
    return lr


def make_optimizer(config: OptimizerConfig, lr: float | jax.Array | None = None) -> optax.GradientTransformation:
    """With a `step_size_rule` the update takes η_t as `step_size` (agents/step_sizes.py).
    `lr` replaces `config.lr` (`learning_rate`); the optimiser state is the same either way."""
    lr = learning_rate(config, lr)
    if config.step_size_rule != "constant":
        # The gradient times η_t, then SGD at learning rate 1 (as the DAL authors' code).
        inner = optax.chain(scale_by_step_size(),
                            optax.sgd(1.0, momentum=config.momentum or None, nesterov=config.nesterov))
    elif config.name == "sgd":
        # optax's trace is the heavy-ball form v ← βv + g, θ ← θ − ηv of the threshold table.
        inner = optax.sgd(lr, momentum=config.momentum or None, nesterov=config.nesterov)
    elif config.name == "rmsprop":
        inner = optax.rmsprop(lr, decay=config.decay, eps=config.eps, centered=config.centered)
    elif config.name == "adam":
        inner = optax.adam(lr, b1=config.b1, b2=config.b2, eps=config.eps)
    else:
        raise ValueError(f"agent.optimizer.name: unknown optimiser {config.name!r}")
    if config.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), inner)
    return inner
