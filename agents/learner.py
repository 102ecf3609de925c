"""The learner: a jitted TD update of any agent kind (agents/kinds.py) with a periodically copied
target network. It takes batches of `Transition`s and does not know whether
they came from actors or from a recorded dataset.

Two ways to run it: `Learner.update(raw_batch)`, one update on a batch the caller
brings (Reverb), or `Learner.run(data, count)`, `count` updates that each draw their
batch on the device from `data` with the state's PRNG key (the offline regime,
agents/offline.py), fused into one `lax.scan` (dispatched one by one on the CPU: `fuse`
says why), their metrics reduced on the device.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import chex
import numpy as np
import optax

from eosrl.agents import checkpoint, networks, regularisers, spectral_norm, step_sizes
from eosrl.agents.config import AgentConfig
from eosrl.agents.optimizers import learning_rate, make_optimizer
from eosrl.agents.types import LearnerState, NetState, Params, Transition


def make_loss_fn(network: networks.Network, agent: AgentConfig) -> Callable:
    """loss(params, target_params, net_state, target_net_state, batch, update_sn)
    -> (loss, (new_net_state, mean_q)): the TD loss of the network's agent kind
    (agents/kinds.py). The probes differentiate this same function."""
    kind = network.agent_kind

    def loss_fn(params, target_params, net_state, target_net_state, batch: Transition,
                update_sn: bool = False):
        out_tm1, new_net_state = network.apply(params, net_state, batch.obs, update_sn)
        out_t_target, _ = network.apply(target_params, target_net_state, batch.next_obs, False)
        out_t_target = jax.lax.stop_gradient(out_t_target)
        # The bootstrap action: greedy for the online network (double Q-learning) or the target one.
        if agent.double_q:
            out_t_online, _ = network.apply(params, net_state, batch.next_obs, False)
            q_t_selector = jax.lax.stop_gradient(kind.q_values(out_t_online))
        else:
            q_t_selector = kind.q_values(out_t_target)
        loss = kind.loss(out_tm1, batch.action.astype(jnp.int32), batch.reward, batch.discount,
                         out_t_target, q_t_selector)
        mean_q = jnp.mean(kind.q_values(out_tm1))
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
                                 opt_state, step, state.rng)
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


def make_sampling_update(update: Callable, sample_items: Callable[[Any, jax.Array], Any]) -> Callable:
    """update(state, data) -> (new state, metrics): `update` on the raw batch that
    `sample_items(data, key)` draws, the key split from the state's (which the new state
    carries on). The seed and the state then decide every batch: two runs with one
    seed draw the same ones, and a resumed run continues the stream."""

    def sampled(state: LearnerState, data) -> Tuple[LearnerState, Any]:
        rng, key = jax.random.split(state.rng)
        return update(state._replace(rng=rng), sample_items(data, key))

    return sampled


class Summary(NamedTuple):
    """The metrics of a run of updates, reduced as they are made (`accumulate`)."""
    updates: jax.Array  # updates made (int32)
    sum: jax.Array    # [M] per metric, over them
    min: jax.Array
    max: jax.Array
    last: jax.Array   # [M] the last update's
    alive: jax.Array  # no loss so far was non-finite


def empty_summary(size: int) -> Summary:
    """The summary of no update, for metric vectors of `size` entries."""
    vector = lambda value: jnp.full((size,), value, jnp.float32)  # noqa: E731
    return Summary(jnp.zeros((), jnp.int32), vector(0.0), vector(jnp.inf), vector(-jnp.inf), vector(jnp.nan),
                   jnp.asarray(True))


def accumulate(update: Callable, index: Dict[str, int]) -> Callable:
    """step(state, summary, data) -> (state, summary): one `update(state, data)` (metrics as
    one vector, `_as_vector`; `index` names its entries) folded into the running summary,
    so K updates need one copy of their metrics to the host, not K.

    Once a loss has been non-finite, later steps keep the state and summary as they
    are: the state stops at the update that diverged (as the one-update loop stops
    within one) and `updates` says which it was. The update is still computed and then
    dropped by a select: `lax.cond` would move it into a nested computation, which XLA:CPU
    runs several times slower (below)."""

    def step(state: LearnerState, summary: Summary, data) -> Tuple[LearnerState, Summary]:
        new_state, metrics = update(state, data)
        chex.assert_shape(metrics, summary.sum.shape)
        alive = summary.alive

        def keep(new: jax.Array, old: jax.Array) -> jax.Array:
            return jnp.where(alive, new, old)

        state = jax.tree_util.tree_map(keep, new_state, state)
        return state, Summary(updates=summary.updates + alive.astype(jnp.int32),
                              sum=keep(summary.sum + metrics, summary.sum),
                              min=keep(jnp.minimum(summary.min, metrics), summary.min),
                              max=keep(jnp.maximum(summary.max, metrics), summary.max),
                              last=keep(metrics, summary.last),
                              alive=alive & jnp.isfinite(metrics[index["loss"]]))

    return step


def fuse(step: Callable) -> Callable:
    """fused(state, summary, data, length): `length` `accumulate` steps as one `lax.scan`,
    one program with no host dispatch between updates (`Learner.run` on accelerators).
    On XLA:CPU a loop body runs several times slower than the same ops at the top level
    of a program (the MinAtar CNN update at batch 512: 21 against 72-85 updates/s on 2
    cores, measured; the body's ops do not get the top-level program's thread-parallel
    code), so there `Learner.run` dispatches the jitted step K times instead: the same
    function, the same reductions on the device, one copy to the host at the end."""

    def fused(state: LearnerState, summary: Summary, data, length: int):
        (state, summary), _ = jax.lax.scan(lambda carry, _: (step(*carry, data), None), (state, summary), None,
                                           length=length)
        return state, summary

    return fused


def fuse_traced(step: Callable) -> Callable:
    """`fuse` that also returns every update's metric vector ([length, M]: the summary's
    `last` after each step, so it repeats the diverged update's after a divergence), for
    the per-update loss traces (`Learner.run(losses=True)`)."""

    def fused(state: LearnerState, summary: Summary, data, length: int):
        def body(carry, _):
            carry = step(*carry, data)
            return carry, carry[1].last

        (state, summary), lasts = jax.lax.scan(body, (state, summary), None, length=length)
        return state, summary, lasts

    return fused


class UpdateMetrics(Mapping[str, float]):
    """One update's metrics, which stay one float32 vector on the device until the first
    is read; that read (waiting for the update) copies them all to the host at once.
    Kept as separate device scalars, each metric (4 for a plain DQN update, more with
    SN, penalties or a step-size rule) costs a transfer: copying a `train` record's
    window of them was ~6 % of `eosrl train`'s main-thread samples in a py-spy profile
    on MinAtar (benchmarks/README.md, note 5). `index` (name -> position) is the
    learner's, shared by all its updates."""

    count = 1  # updates it holds (a `WindowMetrics` holds several)

    def __init__(self, index: Dict[str, int], values: jax.Array | np.ndarray):
        self._index = index
        self._values = values
        self._host: Optional[np.ndarray] = None

    def _vector(self) -> np.ndarray:
        if self._host is None:
            self._host = np.asarray(self._values)
        return self._host

    def __getitem__(self, name: str) -> float:
        return float(self._vector()[self._index[name]])

    def summary(self) -> Tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """(updates, sum, min, max of each metric), as `WindowMetrics.summary`."""
        values = self._vector()
        return 1, values, values, values

    def block_until_ready(self) -> "UpdateMetrics":
        """Waits for the update (what `jax.block_until_ready` calls on it)."""
        jax.block_until_ready(self._values)
        return self

    def __contains__(self, name: object) -> bool:  # without reading the values
        return name in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


class WindowMetrics(Mapping[str, float]):
    """The metrics of the updates of one `Learner.run`, reduced on the device and read
    (one small copy) when the run ends: `count` updates, and per metric their sum, min
    and max; reading a name gives the last update's value."""

    def __init__(self, index: Dict[str, int], summary: Dict[str, np.ndarray]):
        self._index = index
        self.count = int(summary["updates"])
        self._summary = summary
        self.losses: Optional[np.ndarray] = None  # [count] each update's loss, with `run(losses=True)`

    def summary(self) -> Tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        s = self._summary
        return self.count, s["sum"], s["min"], s["max"]

    @property
    def last(self) -> np.ndarray:
        return self._summary["last"]

    def __getitem__(self, name: str) -> float:
        return float(self.last[self._index[name]])

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def _as_vector(update: Callable, index: Dict[str, int]) -> Callable:
    """`update` returning its metrics as one vector; `index` (filled while tracing) says
    which entry is which."""

    def vector_update(state, batch_or_data):
        state, metrics = update(state, batch_or_data)
        index.clear()
        index.update((name, i) for i, name in enumerate(metrics))
        return state, jnp.stack([jnp.asarray(value, jnp.float32) for value in metrics.values()])

    return vector_update


def make_sampled_update(objective_fn: Callable, optimizer: optax.GradientTransformation, agent: AgentConfig,
                        preprocess: Callable[[Any], Transition], sample_items: Callable[[Any, jax.Array], Any],
                        index: Dict[str, int]) -> Callable:
    """update(state, data) -> (new state, metric vector): one update (`make_update_fn`) on
    the batch it draws from `data` (`make_sampling_update`), its metrics one vector whose
    entries `index` names (`_as_vector`). A learner builds it once from its optimiser; the
    multi-run program builds it inside the traced function from an optimiser whose
    learning rate is an argument, so runs of different step sizes share one program
    (`Learner.accumulated_step_at`, agents/seeds.py)."""
    update = make_update_fn(objective_fn, optimizer, agent, preprocess)
    return _as_vector(make_sampling_update(update, sample_items), index)


class Learner:
    """Holds the learner state and applies the jitted update to it. With `sample_items`
    (data, key -> raw batch) it can also `run` fused updates that draw their batches."""

    def __init__(self, network: networks.Network, agent: AgentConfig, seed: int,
                 preprocess: Callable[[Any], Transition] = lambda batch: batch,
                 sample_items: Optional[Callable[[Any, jax.Array], Any]] = None):
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
        update = make_update_fn(self.objective_fn, self.optimizer, agent, preprocess)
        self._update = jax.jit(_as_vector(update, self._metric_index))
        self._sample_items = sample_items
        self._sampled: Optional[Callable] = None
        if sample_items is not None:
            self._sampled = make_sampled_update(self.objective_fn, self.optimizer, agent, preprocess, sample_items,
                                                self._metric_index)
            step = accumulate(self._sampled, self._metric_index)
            self.accumulated_step = step  # unjitted: the multi-seed runner vmaps it (agents/seeds.py)
            self._fused_step = jax.jit(step)
            self._fused_scan = jax.jit(fuse(step), static_argnums=3)  # once per distinct `count`
            self._fused_scan_traced = jax.jit(fuse_traced(step), static_argnums=3)  # compiled when used
            self.scan = jax.default_backend() != "cpu"  # `fuse` says why
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

    def run(self, data, count: int, losses: bool = False) -> WindowMetrics:
        """`count` updates on batches drawn from `data` on the device, as one program
        (one `lax.scan`; on the CPU `count` dispatches of one jitted step, `fuse` says
        why); waits for them. Stops after an update whose loss is non-finite: the result's
        `count` says how many were made. With `losses` the result's `losses` holds each
        update's loss too (the per-update metric vectors come back with the summary)."""
        state, summary = self.state, empty_summary(self.metric_size(data))
        lasts: Any = []
        if self.scan and losses:
            state, summary, lasts = self._fused_scan_traced(state, summary, data, int(count))
        elif self.scan:
            state, summary = self._fused_scan(state, summary, data, int(count))
        else:
            for _ in range(int(count)):  # dispatched without waiting; read once below
                state, summary = self._fused_step(state, summary, data)
                if losses:
                    lasts.append(summary.last)
        window = self.adopt(state, jax.device_get(summary._asdict()))
        if losses:
            window.losses = np.asarray(jax.device_get(lasts)).reshape(-1, len(self._metric_index))[
                :window.count, self._metric_index["loss"]]
        return window

    def accumulated_step_at(self, lr: jax.Array) -> Callable:
        """`accumulated_step` with the learning rate `lr` (a traced scalar) in place of
        agent.optimizer.lr: the same function of the same state, the optimiser's state
        included (its rate is no part of it), so the multi-run program vmaps runs that
        differ in step size over their `lr` (agents/seeds.py). Call it inside the traced
        function: the optimiser is built from the tracer."""
        assert self._sample_items is not None, "a Learner made without sample_items cannot run on data"
        sampled = make_sampled_update(self.objective_fn, make_optimizer(self.agent.optimizer, lr), self.agent,
                                      self.preprocess, self._sample_items, self._metric_index)
        return accumulate(sampled, self._metric_index)

    def metric_size(self, data) -> int:
        """The entries of an update's metric vector (tracing the sampling update once)."""
        assert self._sampled is not None, "a Learner made without sample_items cannot run on data"
        if not self._metric_index:  # traces the update once, to size the summary
            jax.eval_shape(self._sampled, self.state, data)
        return len(self._metric_index)

    def adopt(self, state: LearnerState, summary: Dict[str, np.ndarray]) -> WindowMetrics:
        """Takes the state after a run of updates and their summary (on the host) as `run`
        takes its own; the multi-seed runner (agents/seeds.py) hands each seed's learner
        its slice of the vmapped run this way."""
        self.state = state
        window = WindowMetrics(self._metric_index, summary)
        self._step += window.count
        self._last_metrics = UpdateMetrics(self._metric_index, window.last) if "lr" in window else None
        return window

    @property
    def step(self) -> int:
        return self._step

    def current_lr(self) -> float:
        """The step size now: the schedule's, or with a step-size rule the last update's
        η_t (waiting for that update; before the first, `lr`, as no η_t exists yet)."""
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
