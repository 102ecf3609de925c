"""Hessian probes: the sharpness of the TD loss, measured against the optimiser's
stability threshold, plus a few cheaper curvature-related quantities.

The parameters are raveled into one flat vector (`jax.flatten_util.ravel_pytree`)
and the Hessian H is touched only through Hessian-vector products (HVPs), so it
is never materialised; the eigensolvers are in agents/eigensolvers.py.

What is measured is the operator the optimiser's next step actually sees. The
update is θ ← θ − η D m with a diagonal D: 1 for SGD, P⁻¹ for Adam and RMSProp
(P read from the real optax state), times the per-layer 1/max(1, σ) of
`agent.spectral_norm.scale_lr`. Its stability is that of heavy ball, Adam, ...
on D^½ H D^½ (similar to D H, hence the same eigenvalues, but symmetric), which
is what the threshold of agents/thresholds.py applies to. With gradient
clipping (`max_grad_norm`) a clipped step is shorter than η: the threshold is
then that of the unclipped step, a lower bound on the real one.

- `ProbeSnapshot`: what a probe needs of the learner at one update, and only
  that; the learner makes it (`Prober.snapshot`), and with `probe.mode:
  process` it travels to a prober process through Reverb;
- `Prober.probe(snapshot, batch, sharpness_batches)`: the `probe` record, with
  HVPs spent, Ritz residuals and a flag for every eigenvalue that did not
  converge, and the batch sharpness on fresh batches (`draw_sharpness_batches`).
  It keeps the eigenvectors of its last probe to warm-start the next one;
- `top_eigenvalues(loss_of_params, params, ...)`: the generic entry point, for
  any scalar loss of a params pytree (used by the supervised benchmark).
"""
from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from eosrl.agents import batch_sharpness, readings, step_readings
from eosrl.agents.config import AgentConfig, OptimizerConfig, ProbeConfig
from eosrl.agents.preconditioning import operator_name, step_scaling
from eosrl.agents.eigensolvers import (Matvec, hutchinson_trace, lanczos_eigenpairs, make_hvp, preconditioned,
                                       random_init, smallest_eigenpair, top_eigenpairs)
from eosrl.agents.regularisers import q_network_complexity
from eosrl.agents.thresholds import is_adaptive, stability_threshold


# ----------------------------------------------------------------------------
# The generic entry point: Lanczos on any scalar loss of a params pytree.


def top_eigenvalues(loss_of_params: Callable[[Any], jnp.ndarray], params: Any, num_eigs: int,
                    iterations: int, rng: jax.Array, precond: Any = None,
                    smallest: bool = False) -> Dict[str, jnp.ndarray]:
    """Top eigenvalues of the Hessian of `loss_of_params` at `params`, by Lanczos.

    `precond`: optional diagonal preconditioner P (a pytree shaped like
    params, all entries > 0); the eigenvalues are then those of P⁻¹H.
    Returns `values` (largest first), `residuals` (‖Hv − λv‖ of each), and
    `lambda_min`, `lambda_min_residual` when `smallest`. A pure function: the
    caller jits it once (`num_eigs`, `iterations`, `smallest` static) to reuse
    the compiled solver across calls (benchmarks/eos_supervised.py does).
    """
    flat, unravel = ravel_pytree(params)
    matvec = make_hvp(lambda x: loss_of_params(unravel(x)), flat)
    if precond is not None:
        matvec = preconditioned(matvec, jax.lax.rsqrt(ravel_pytree(precond)[0]))
    out = lanczos_eigenpairs(matvec, flat.shape[0], num_eigs, iterations, rng, 1.0, flat.dtype)
    keep = ("values", "residuals") + (("lambda_min", "lambda_min_residual") if smallest else ())
    return {key: out[key] for key in keep}


# ----------------------------------------------------------------------------
# The instrument.


def draw_sharpness_batches(count: int, batch_size: int, sample_items: Callable[[int], Any],
                           preprocess: Callable[[Any], Any]) -> List[Any]:
    """`count` fresh batches of `batch_size` raw items, each through `preprocess`
    (as the probe batch is): what `Prober.probe` measures the batch sharpness on.
    `sample_items(n)` draws n raw replay items; the learner loop and the prober
    process each pass their own, so both draw the batches the same way."""
    return [preprocess(sample_items(batch_size)) for _ in range(count)]


class ProbeSnapshot(NamedTuple):
    """What a probe needs of the learner at one update: the TD loss's arguments
    other than the batch, the scaling of its next step, and where it stood.

    The prober process gets it through Reverb encoded field by field
    (launch/channels.py), decoded by the fields of `like`: a new field is one
    line here (give it a default: a number, or None for an optional array; a
    new parameter-shaped tree also goes into `like`)."""
    params: Any
    target_params: Any
    net_state: Any
    target_net_state: Any
    step_scaling: Optional[jnp.ndarray] = None  # D^½, flat; None when the step is unscaled
    step: int = 0
    lr: float = 0.0
    env_steps: int = 0
    # Δθ of the update that made `params` (params − the previous ones), flat; None when not kept.
    last_update: Optional[jnp.ndarray] = None
    # The optimiser's momentum buffer (heavy ball's trace, Adam's μ), flat; None without one.
    momentum: Optional[jnp.ndarray] = None

    @classmethod
    def like(cls, params: Any, net_state: Any) -> "ProbeSnapshot":
        """A snapshot shaped as those of a network with these parameters and state,
        every other field at its default: what a channel decodes snapshots by."""
        return cls(params, params, net_state, net_state)


def _finite_or_none(x: float) -> Optional[float]:
    """JSON has no infinity: an unbounded threshold (lr = 0) is written as null."""
    return x if math.isfinite(x) else None


class Prober:
    """Measures the Hessian of a TD loss on a probe batch.

    It takes the loss, not a learner: `loss_fn(params, target_params, net_state,
    target_net_state, batch, False)` as `agents.learner.make_loss_fn(network,
    agent)` makes it (no optimiser: a prober process builds none); target
    parameters, batch and SN vectors are held fixed, only the online parameters
    vary. `agent` gives the optimiser's settings (the threshold, the operator's
    name), `network` the Q-network of the geometric complexity. Batches are
    `Transition`s as the loss takes them, i.e. already through the layout's
    `to_transition` (`Learner.preprocess`). The caller owns the batch (for
    `probe.batch: fixed` one batch, kept with the run). The eigenvectors of
    the last probe start the next one (`lobpcg`).
    """

    def __init__(self, config: ProbeConfig, agent: AgentConfig, loss_fn: Callable, network: Any,
                 seed: int = 0, objective_fn: Optional[Callable] = None):
        self.config = config
        # `objective_fn` (`make_objective_fn`'s, same arguments): with a penalty on, full probes
        # also measure λ₁ of the objective the optimiser descends (`objective_sharpness`).
        penalised = agent.gradient_penalty or agent.geometric_complexity_penalty
        self.objective_fn = objective_fn if penalised else None
        self._seed = seed
        self.loss_fn = loss_fn
        self.network = network
        self.agent = agent
        self.opt_config: OptimizerConfig = agent.optimizer
        self.scaled = is_adaptive(self.opt_config) or self.agent.spectral_norm.scale_lr
        self._rng = jax.random.PRNGKey(seed)
        self._vectors: Optional[Dict[str, jnp.ndarray]] = None  # of the last probe
        self._snapshot = jax.jit(lambda s: step_scaling(s.opt_state, s.net_state, s.params, self.agent))
        self._ravel = jax.jit(lambda tree: ravel_pytree(tree)[0])
        self._difference = jax.jit(lambda new, old: ravel_pytree(new)[0] - ravel_pytree(old)[0])
        self._measure = jax.jit(self._measure_fn, static_argnums=4)  # once per batch shape and kind
        self._trace = jax.jit(self._trace_fn)
        self._complexity = jax.jit(self._complexity_fn)
        self._batch_sharpness = jax.jit(  # compiled once per (K, batch shape)
            functools.partial(batch_sharpness.measure, loss_fn, config, self.opt_config))
        # Readings beside λ₁ (`_add_readings`), each warm-started from its own last vector.
        self._loss_readings = jax.jit(self._loss_readings_fn)
        self._gauss_newton = jax.jit(self._gauss_newton_fn)
        self._objective = jax.jit(self._objective_fn)
        self._layers = jax.jit(self._layers_fn)
        self._dataset = jax.jit(self._dataset_fn)
        self._reading_vectors: Dict[str, jnp.ndarray] = {}
        self._dataset_index: Optional[jnp.ndarray] = None  # chosen once per run (`readings.dataset_index`)

    def should_probe(self, step: int) -> bool:
        """Probe every `config.every` learner updates (not before the first:
        an adaptive optimiser has no preconditioner until it has seen a gradient)."""
        return self.config.enabled and step > 0 and step % self.config.every == 0

    def is_full(self, step: int) -> bool:
        """Whether the probe at `step` is a full one (`probe.full_every`), else λ₁ only."""
        return not self.config.full_every or step % self.config.full_every == 0

    def forget_vectors(self) -> None:
        """The next probe starts cold (random vectors), as after a restart."""
        self._vectors = None
        self._reading_vectors = {}

    def snapshot(self, state, lr: float, env_steps: int, previous_params: Any = None) -> ProbeSnapshot:
        """The snapshot of a learner state (on the learner's side). `previous_params`: the
        parameters before the update that made `state` (kept by the caller), for `last_update`."""
        buffer = step_readings.momentum_buffer(state.opt_state)
        return ProbeSnapshot(state.params, state.target_params, state.net_state, state.target_net_state,
                             self._snapshot(state) if self.scaled else None, int(state.step), lr, env_steps,
                             last_update=(None if previous_params is None
                                          else self._difference(state.params, previous_params)),
                             momentum=None if buffer is None else self._ravel(buffer))

    # -- the jitted measurements ------------------------------------------------

    def _loss_of_flat(self, snap: ProbeSnapshot, batch):
        flat, unravel = ravel_pytree(snap.params)

        def loss(x):
            return self.loss_fn(unravel(x), snap.target_params, snap.net_state,
                                snap.target_net_state, batch, False)[0]
        return loss, flat

    def _solve(self, matvec: Matvec, init: jnp.ndarray, rng: jax.Array) -> Dict[str, jnp.ndarray]:
        c = self.config
        if c.method == "lanczos":
            return lanczos_eigenpairs(matvec, init.shape[1], init.shape[0], c.iterations, rng, c.tolerance,
                                      init.dtype)
        return top_eigenpairs(matvec, init, c.tolerance, c.iterations)

    def _measure_fn(self, snap: ProbeSnapshot, batch, vectors: Dict[str, jnp.ndarray], rng, full: bool = True):
        """A full probe, or (`full` False) λ₁ alone: the solver on the first start vector
        only (the last probe's top eigenvector), whose new vector replaces it."""
        c = self.config
        loss, flat = self._loss_of_flat(snap, batch)
        hvp = make_hvp(loss, flat)
        k_main, k_raw = jax.random.split(rng)
        scaling = snap.step_scaling
        operator = hvp if scaling is None else preconditioned(hvp, scaling)
        main = self._solve(operator, vectors["main"] if full else vectors["main"][:1], k_main)
        out = {key: main[key] for key in ("values", "residuals", "converged")}
        # v₁ with the sign that continues the last probe's, and how far it turned (`probe`).
        v1, out["v1_overlap"] = step_readings.orient(vectors["main"][0], main["vectors"][0])
        found = main["vectors"].at[0].set(v1)
        new_vectors = {"main": found if full else vectors["main"].at[:1].set(found)}
        if snap.last_update is not None:
            out["update_projection_v1"], out["update_projection_v1_cosine"] = step_readings.update_projection(
                snap.last_update, v1, scaling)
        out["grad_norm"] = jnp.linalg.norm(jax.grad(loss)(flat))
        out["param_norm"] = jnp.linalg.norm(flat)
        hvps = main["hvps"]
        if not full:
            out["hvps"] = hvps
            return out, new_vectors
        if scaling is not None:  # λ₁ of H itself, for comparison
            raw = self._solve(hvp, vectors["raw"], k_raw)
            out["raw_sharpness"], new_vectors["raw"], hvps = raw["values"][0], raw["vectors"][:1], hvps + raw["hvps"]
        if c.smallest:
            if c.method == "lanczos":
                out["lambda_min"], out["lambda_min_residual"] = main["lambda_min"], main["lambda_min_residual"]
            else:
                low = smallest_eigenpair(operator, vectors["min"], c.tolerance, c.iterations)
                out["lambda_min"], out["lambda_min_residual"] = low["values"][0], low["residuals"][0]
                new_vectors["min"], hvps = low["vectors"], hvps + low["hvps"]
        out["hvps"] = hvps
        return out, new_vectors

    def _trace_fn(self, snap: ProbeSnapshot, batch, rng):
        loss, flat = self._loss_of_flat(snap, batch)
        return hutchinson_trace(make_hvp(loss, flat), flat.shape[0], self.config.hutchinson_samples, rng,
                                flat.dtype)

    def _complexity_fn(self, snap: ProbeSnapshot, batch):
        return q_network_complexity(self.network, snap.params, snap.net_state, batch.obs)

    def _loss_readings_fn(self, snap: ProbeSnapshot, batch):
        """The loss whose Hessian is probed, on the batch, and the agent kind's
        `loss_diagnostics` of it (e.g. `huber_fraction`): forward passes, no HVP."""
        loss, flat = self._loss_of_flat(snap, batch)
        outputs, targets = readings.td_loss_parts(self.network, self.agent, snap.params, snap.target_params,
                                                  snap.net_state, snap.target_net_state, batch)
        return {"loss": loss(flat), **self.network.agent_kind.loss_diagnostics(outputs(snap.params), *targets)}

    def _one_vector(self, matvec: Matvec, scaling: Optional[jnp.ndarray], init: jnp.ndarray, rng: jax.Array):
        """λ₁ of D^½ M D^½ (M = `matvec`, D^½ = `scaling`, None: D = 1) by the probe's solver
        on one vector started from `init` [1, dim]."""
        out = self._solve(matvec if scaling is None else preconditioned(matvec, scaling), init, rng)
        return {key: out[key] for key in ("values", "residuals", "converged", "vectors", "hvps")}

    def _gauss_newton_fn(self, snap: ProbeSnapshot, batch, init: jnp.ndarray, rng: jax.Array):
        """λ₁ of D^½ G D^½, G = Jᵀ∇²ℓJ of the TD loss ℓ(f(θ)) on the batch (`readings.td_loss_parts`)."""
        flat, unravel = ravel_pytree(snap.params)
        outputs, targets = readings.td_loss_parts(self.network, self.agent, snap.params, snap.target_params,
                                                  snap.net_state, snap.target_net_state, batch)
        kind = self.network.agent_kind
        matvec = readings.gauss_newton_matvec(lambda x: outputs(unravel(x)), lambda out: kind.loss(out, *targets),
                                              flat)
        return self._one_vector(matvec, snap.step_scaling, init, rng)

    def _objective_fn(self, snap: ProbeSnapshot, batch, init: jnp.ndarray, rng: jax.Array):
        """λ₁ of D^½ ∇²(TD loss + penalties) D^½ on the batch (`make_objective_fn`'s objective)."""
        flat, unravel = ravel_pytree(snap.params)

        def objective(x):
            return self.objective_fn(unravel(x), snap.target_params, snap.net_state, snap.target_net_state,
                                     batch, False)[0]
        return self._one_vector(make_hvp(objective, flat), snap.step_scaling, init, rng)

    def _layers_fn(self, snap: ProbeSnapshot, batch, inits: Dict[str, jnp.ndarray], rng: jax.Array):
        """Per layer, λ₁ of its diagonal block of D^½HD^½ (`readings.layer_matvecs`)."""
        def loss(params):
            return self.loss_fn(params, snap.target_params, snap.net_state, snap.target_net_state, batch, False)[0]
        blocks = readings.layer_matvecs(loss, snap.params, snap.step_scaling)
        return {name: self._one_vector(matvec, None, inits[name], jax.random.fold_in(rng, i))
                for i, (name, (matvec, _)) in enumerate(blocks.items())}

    def _dataset_fn(self, snap: ProbeSnapshot, data, index: jnp.ndarray, init: jnp.ndarray, rng: jax.Array):
        """λ₁ of D^½ H D^½, H the Hessian of the mean loss over the items `index` of `data`
        (a `DeviceDataset`), in chunks of `probe.batch_size` (`readings.dataset_hvp`)."""
        flat, unravel = ravel_pytree(snap.params)

        def loss_on(x, batch):
            return self.loss_fn(unravel(x), snap.target_params, snap.net_state, snap.target_net_state, batch,
                                False)[0]
        chunk = min(self.config.batch_size, int(index.shape[0]))
        return self._one_vector(readings.dataset_hvp(loss_on, flat, data, index, chunk), snap.step_scaling, init,
                                rng)

    def _reading_init(self, key: str, fallback: jnp.ndarray) -> jnp.ndarray:
        return self._reading_vectors.get(key, fallback)

    def _add_readings(self, record: Dict[str, Any], snap: ProbeSnapshot, batch, full: bool, dataset: Any,
                      top: jnp.ndarray, rng: jax.Array) -> None:
        """Adds the readings due at this probe to `record` (docs/design.md, "Probe readings"):
        `loss` and the kind's diagnostics always; λ₁ of the Gauss–Newton matrix, of each
        layer's block, of the penalised objective (full probes, penalty on) and of the loss
        over `dataset` on their cadences. Each solve starts from its own last vector, the
        first from `top` (this probe's top eigenvector) or, per layer, a random one; their
        products count in `hvps`, except the dataset's (`dataset_hvps`, over the dataset)."""
        c, step = self.config, snap.step
        record.update({key: float(value) for key, value in jax.device_get(self._loss_readings(snap, batch)).items()})

        def solved(name: str, out: Dict[str, Any], vector_key: str) -> int:
            out = jax.device_get(out)
            self._reading_vectors[vector_key] = out["vectors"]
            record[f"{name}_sharpness"] = float(out["values"][0])
            record[f"{name}_residual"] = float(out["residuals"][0])
            record[f"{name}_converged"] = bool(out["converged"][0])
            return int(out["hvps"])

        if c.gauss_newton_every and step % c.gauss_newton_every == 0:
            out = self._gauss_newton(snap, batch, self._reading_init("gauss_newton", top), jax.random.fold_in(rng, 3))
            record["hvps"] += solved("gauss_newton", out, "gauss_newton")
        if self.objective_fn is not None and full:
            out = self._objective(snap, batch, self._reading_init("objective", top), jax.random.fold_in(rng, 4))
            record["hvps"] += solved("objective", out, "objective")
        if c.layer_every and step % c.layer_every == 0:
            inits = {name: self._reading_init(f"layer/{name}", random_init(jax.random.fold_in(rng, 5 + i), 1,
                                                                           ravel_pytree(layer)[0].shape[0]))
                     for i, (name, layer) in enumerate(snap.params.items())}
            outs = jax.device_get(self._layers(snap, batch, inits, jax.random.fold_in(rng, 5)))
            record["layer_sharpness"] = {name: float(out["values"][0]) for name, out in outs.items()}
            record["layer_converged"] = all(bool(out["converged"][0]) for out in outs.values())
            record["hvps"] += sum(int(out["hvps"]) for out in outs.values())
            self._reading_vectors.update({f"layer/{name}": out["vectors"] for name, out in outs.items()})
        if dataset is not None and c.dataset_every and step % c.dataset_every == 0:
            if self._dataset_index is None:
                self._dataset_index = jnp.asarray(readings.dataset_index(dataset.size, c.dataset_transitions,
                                                                         self._seed))
            out = self._dataset(snap, dataset, self._dataset_index, self._reading_init("dataset", top),
                                jax.random.fold_in(rng, 6))
            record["dataset_hvps"] = solved("dataset", out, "dataset")
            record["dataset_transitions"] = int(self._dataset_index.shape[0])

    def _start_vectors(self, dim: int, rng: jax.Array) -> Dict[str, jnp.ndarray]:
        """The last probe's eigenvectors, or random ones for the first probe."""
        if self._vectors is not None:
            return self._vectors
        k_main, k_raw, k_min = jax.random.split(rng, 3)
        return {"main": random_init(k_main, self.config.num_eigs, dim), "raw": random_init(k_raw, 1, dim),
                "min": random_init(k_min, 1, dim)}

    # -- the record -------------------------------------------------------------

    def probe(self, snap: ProbeSnapshot, batch, sharpness_batches: Optional[Sequence[Any]] = None,
              full: bool = True, dataset: Any = None) -> Dict[str, Any]:
        """Measures `snap` on `batch`; a JSON-ready `probe` record (`full`, and `num_eigs`
        eigenvalues). With `full` False (between full probes, `is_full`) λ₁ alone: the
        record has one eigenvalue and no `raw_sharpness`, `lambda_min` or batch sharpness.
        Either kind has `v1_overlap` (after a first probe) and, when the snapshot has the
        last update's Δθ, `update_projection_v1` and `_cosine` (agents/step_readings.py;
        docs/design.md, "Readings of the step").

        `sharpness_batches`: K preprocessed batches of the training batch size
        (`draw_sharpness_batches`); then the record also has, over them
        (`batch_sharpness.measure`), `batch_sharpness` (mean step sharpness) and
        `batch_lambda_max` (mean λ_max(D^½H_BD^½)), each with `_stderr` over the
        batches (0 for K = 1) and `_over_threshold`; the largest residual of the
        λ_max and whether all converged; K, the batch size, and `batch_hvps`
        (included in `hvps`); with a momentum buffer in the snapshot also
        `momentum_batch_sharpness` (`_stderr`, `_over_threshold`), along the momentum
        step. The threshold is the record's, λ₁'s: 2/η for SGD,
        where the paper finds batch sharpness settling. With momentum β it is
        (2+2β)/η (Cohen et al., 2021), which the EoSS paper does not establish
        for batch sharpness: its follow-up (arXiv:2604.14108, abstract) reports
        a plateau at 2(1+β)/η for large batches but 2(1−β)/η for small ones. For
        Adam/RMSProp the ratio is an analogue, not a published result.

        Every record also has the readings of `_add_readings` that are due (`loss`,
        `huber_fraction`, `gauss_newton_sharpness`, `layer_sharpness`, `objective_sharpness`,
        and with `dataset`, the run's `DeviceDataset` offline, `dataset_sharpness`)."""
        c, step = self.config, snap.step
        start = time.perf_counter()
        rng = jax.random.fold_in(self._rng, step)
        warm = self._vectors is not None and c.method == "lobpcg"
        previous = self._vectors is not None  # a last probe whose v₁ `v1_overlap` compares with
        vectors = self._start_vectors(ravel_pytree(snap.params)[0].shape[0], rng)
        out, new_vectors = self._measure(snap, batch, vectors, rng, full)
        out = jax.device_get(out)
        self._vectors = {**vectors, **new_vectors}
        threshold = stability_threshold(self.opt_config, snap.lr)
        eigenvalues = [float(v) for v in out["values"]]
        record: Dict[str, Any] = {
            "kind": "probe", "step": step, "full": full, "num_eigs": int(len(out["values"])),
            "method": c.method, "operator": operator_name(self.agent),
            "preconditioned": is_adaptive(self.opt_config), "warm_start": warm,
            "eigenvalues": eigenvalues, "residuals": [float(r) for r in out["residuals"]],
            "converged": [bool(x) for x in out["converged"]], "sharpness": eigenvalues[0],
            "lr": snap.lr, "threshold": _finite_or_none(threshold),
            "sharpness_over_threshold": eigenvalues[0] / threshold if math.isfinite(threshold) else 0.0,
            "grad_norm": float(out["grad_norm"]), "param_norm": float(out["param_norm"]),
            "hvps": int(out["hvps"]),
        }
        for key in ("raw_sharpness", "lambda_min", "lambda_min_residual", "update_projection_v1",
                    "update_projection_v1_cosine") + (("v1_overlap",) if previous else ()):
            if key in out:
                record[key] = float(out[key])
        if c.trace_every and step % c.trace_every == 0:
            trace, stderr = jax.device_get(self._trace(snap, batch, jax.random.fold_in(rng, 1)))
            record.update(trace=float(trace), trace_stderr=float(stderr))
            record["hvps"] += c.hutchinson_samples
        if c.geometric_complexity_every and step % c.geometric_complexity_every == 0:
            record["geometric_complexity"] = float(self._complexity(snap, batch))
        self._add_readings(record, snap, batch, full, dataset, new_vectors["main"][:1], rng)
        if sharpness_batches:
            record.update(self._batch_sharpness_record(snap, sharpness_batches, new_vectors["main"][:1],
                                                       jax.random.fold_in(rng, 2), threshold))
            record["hvps"] += record["batch_hvps"]
        record["seconds"] = time.perf_counter() - start  # the first includes compilation
        return record

    def _batch_sharpness_record(self, snap: ProbeSnapshot, batches: Sequence[Any], init: jnp.ndarray,
                                rng: jax.Array, threshold: float) -> Dict[str, Any]:
        """The batch-sharpness fields of a record (see `probe`; agents/batch_sharpness.py)."""
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *batches)  # stays where preprocess put it
        out = jax.device_get(self._batch_sharpness(snap, stacked, init, rng))
        return batch_sharpness.record_fields(out, len(batches), int(jax.tree_util.tree_leaves(batches[0])[0].shape[0]),
                                             threshold)
