"""The learner: a jitted TD update of DQN or C51 with a periodically copied
target network. It takes batches of `Transition`s and does not know whether
they came from actors or from a recorded dataset.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eosrl.agents import checkpoint, losses, networks, regularisers, spectral_norm, step_sizes
from eosrl.agents.config import AgentConfig
from eosrl.agents.optimizers import learning_rate, make_optimizer
from eosrl.agents.types import LearnerState, NetState, Params, Transition


def make_loss_fn(network: networks.Network, agent: AgentConfig) -> Callable:
    """loss(params, target_params, net_state, target_net_state, batch, update_sn)
    -> (loss, (new_net_state, mean_q)). The probes differentiate this same function."""

    def loss_fn(params, target_params, net_state, target_net_state, batch: Transition,
                update_sn: bool = False):
        out_tm1, new_net_state = network.apply(params, net_state, batch.obs, update_sn)
        out_t_target, _ = network.apply(target_params, target_net_state, batch.next_obs, False)
        out_t_target = jax.lax.stop_gradient(out_t_target)
        if agent.double_q:
            out_t_online, _ = network.apply(params, net_state, batch.next_obs, False)
            q_t_selector = jax.lax.stop_gradient(networks.q_values(network, out_t_online))
        else:
            q_t_selector = None
        action = batch.action.astype(jnp.int32)
        if agent.kind == "dqn":
            loss = losses.dqn_loss(out_tm1, action, batch.reward, batch.discount,
                                   out_t_target, q_t_selector, agent.huber_delta)
        else:
            if q_t_selector is None:
                q_t_selector = networks.q_values(network, out_t_target)
            assert network.atoms is not None  # a C51 network has its support
            loss = losses.c51_loss(out_tm1, action, batch.reward, batch.discount,
                                   out_t_target, q_t_selector, network.atoms)
        mean_q = jnp.mean(networks.q_values(network, out_tm1))
        return loss, (new_net_state, mean_q)

    return loss_fn


def make_objective_fn(loss_fn: Callable, network: networks.Network, agent: AgentConfig) -> Callable:
    """objective(params, target_params, net_state, target_net_state, batch, update_sn)
    -> (TD loss + penalties, (new_net_state, mean_q, terms)): what the optimiser descends.
    `terms` holds the TD loss and each penalty's unscaled value (agents/regularisers.py).
    The probes measure the TD loss (`loss_fn`), as the papers on both penalties do."""
    gradient_penalty, complexity_penalty = agent.gradient_penalty, agent.geometric_complexity_penalty

    def objective(params, target_params, net_state, target_net_state, batch: Transition,
                  update_sn: bool = False):
        loss, (new_net_state, mean_q) = loss_fn(params, target_params, net_state, target_net_state,
                                                batch, update_sn)
        terms, total = {"loss": loss}, loss
        if gradient_penalty:
            td_loss = lambda p: loss_fn(p, target_params, new_net_state, target_net_state, batch, False)[0]
            terms["gradient_norm_sq"] = regularisers.gradient_norm_penalty(td_loss, params)
            total = total + gradient_penalty * terms["gradient_norm_sq"]
        if complexity_penalty:
            obs = batch.obs[:agent.geometric_complexity_rows] if agent.geometric_complexity_rows else batch.obs
            terms["geometric_complexity"] = regularisers.q_network_complexity(network, params, new_net_state, obs)
            total = total + complexity_penalty * terms["geometric_complexity"]
        return total, (new_net_state, mean_q, terms)

    return objective


def make_update_fn(objective_fn: Callable, optimizer: optax.GradientTransformation, agent: AgentConfig,
                   preprocess: Callable[[Any], Transition]) -> Callable:
    """update(state, raw_batch) -> (new state, device metrics): a pure function of its
    arguments and of what it closes over here, never of a learner object's attributes,
    so jitting it cannot bake in state that later changes (as in DQN Zoo's agents).
    With a step-size rule the metrics include `lr`, the η_t of this update."""
    scale_lr, period = agent.spectral_norm.scale_lr, agent.target_update_period
    rule = agent.optimizer.step_size_rule != "constant"

    def update(state: LearnerState, raw_batch) -> Tuple[LearnerState, Dict[str, jax.Array]]:
        batch = preprocess(raw_batch)
        rng, _ = jax.random.split(state.rng)
        grad_fn = jax.value_and_grad(objective_fn, has_aux=True)
        (objective, (net_state, mean_q, terms)), grads = grad_fn(
            state.params, state.target_params, state.net_state, state.target_net_state,
            batch, True)
        extra: Dict[str, jax.Array] = {}
        if rule:
            # The curvature of the function just differentiated: this update's SN vectors.
            of_params = lambda p: objective_fn(p, state.target_params, net_state, state.target_net_state,
                                               batch, False)[0]
            extra["lr"] = step_sizes.step_size(agent.optimizer, of_params, state.params, objective, grads)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params, step_size=extra["lr"])
        else:
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        if scale_lr:
            updates = spectral_norm.scale_updates(updates, net_state)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        target_params = optax.periodic_update(params, state.target_params, step, period)
        target_net_state = optax.periodic_update(net_state, state.target_net_state, step, period)
        new_state = LearnerState(params, target_params, net_state, target_net_state,
                                 opt_state, step, rng)
        metrics = {
            **terms,
            **extra,
            "mean_q": mean_q,
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),
            **spectral_norm.sigmas(net_state),
        }
        return new_state, metrics

    return update


class UpdateMetrics(Mapping[str, float]):
    """One update's metrics, which stay one float32 vector on the device until the first
    is read; that read (waiting for the update) copies them all to the host at once.
    Kept as separate device scalars, each metric (4 for a plain DQN update, more with
    SN, penalties or a step-size rule) costs a transfer: copying a `train` record's
    window of them was ~6 % of `eosrl train`'s main-thread samples in a py-spy profile
    on MinAtar (benchmarks/README.md, note 5). `index` (name -> position) is the
    learner's, shared by all its updates."""

    def __init__(self, index: Dict[str, int], values: jax.Array):
        self._index = index
        self._values = values
        self._host: Optional[np.ndarray] = None

    def __getitem__(self, name: str) -> float:
        if self._host is None:
            self._host = np.asarray(self._values)
        return float(self._host[self._index[name]])

    def block_until_ready(self) -> "UpdateMetrics":
        """Waits for the update (what `jax.block_until_ready` calls on it)."""
        self._values.block_until_ready()
        return self

    def __contains__(self, name: object) -> bool:  # without reading the values
        return name in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def _as_vector(update: Callable, index: Dict[str, int]) -> Callable:
    """`update` returning its metrics as one vector; `index` (filled while tracing) says
    which entry is which."""

    def vector_update(state, raw_batch):
        state, metrics = update(state, raw_batch)
        index.clear()
        index.update((name, i) for i, name in enumerate(metrics))
        return state, jnp.stack([jnp.asarray(value, jnp.float32) for value in metrics.values()])

    return vector_update


class Learner:
    """Holds the learner state and applies the jitted update to it."""

    def __init__(self, network: networks.Network, agent: AgentConfig, seed: int,
                 preprocess: Callable[[Any], Transition] = lambda batch: batch):
        self.network = network
        self.agent = agent
        self.optimizer = make_optimizer(agent.optimizer)
        self.loss_fn = make_loss_fn(network, agent)
        self.objective_fn = make_objective_fn(self.loss_fn, network, agent)
        self._lr = learning_rate(agent.optimizer)
        self.preprocess = preprocess
        rng = jax.random.PRNGKey(seed)
        init_rng, rng = jax.random.split(rng)
        params, net_state = network.init(init_rng)
        self.state = LearnerState(
            params=params, target_params=params, net_state=net_state,
            target_net_state=net_state, opt_state=self.optimizer.init(params),
            step=jnp.zeros((), jnp.int32), rng=rng)
        self._metric_index: Dict[str, int] = {}  # filled when the update is traced
        self._update = jax.jit(_as_vector(make_update_fn(self.objective_fn, self.optimizer, agent, preprocess),
                                          self._metric_index))
        # The update count on the host: reading `state.step` would wait for the update in
        # flight, and the loop asks for the count after every update.
        self._step = 0
        self._last_metrics: Optional[UpdateMetrics] = None  # the last update's, with a step-size rule

    def update(self, raw_batch) -> UpdateMetrics:
        """One update, dispatched without waiting for it; reading its metrics waits for it."""
        self.state, values = self._update(self.state, raw_batch)
        self._step += 1
        metrics = UpdateMetrics(self._metric_index, values)
        self._last_metrics = metrics if "lr" in metrics else None
        return metrics

    @property
    def step(self) -> int:
        return self._step

    def current_lr(self) -> float:
        """The step size now: the schedule's, or with a step-size rule the last update's
        η_t (waiting for that update; before the first, the rule's cap `lr`)."""
        if self._last_metrics is not None:
            return self._last_metrics["lr"]
        lr = self._lr
        return float(lr(self._step)) if callable(lr) else float(lr)

    def acting_params(self) -> Tuple[Params, NetState]:
        """What actors and evaluators need: online params and the SN vectors."""
        return self.state.params, self.state.net_state

    def save(self, directory, meta: Optional[dict] = None, keep: int = 3, extra: Any = None):
        tree = {"learner": self.state, "extra": extra if extra is not None else {}}
        return checkpoint.save(directory, self.step, tree, meta, keep)

    def restore(self, path, extra_template: Any = None) -> tuple:
        template = {"learner": self.state, "extra": extra_template if extra_template is not None else {}}
        tree, meta = checkpoint.load(path, template)
        self.state = jax.tree_util.tree_map(jnp.asarray, tree["learner"])
        self._step = int(self.state.step)
        return tree["extra"], meta
