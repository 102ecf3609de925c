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
import optax
from jax.flatten_util import ravel_pytree

from eosrl.agents import spectral_norm
from eosrl.agents.config import AgentConfig, OptimizerConfig, ProbeConfig
from eosrl.agents.eigensolvers import (Matvec, hutchinson_trace, lanczos, lanczos_eigenpairs, make_hvp,
                                       preconditioned, random_init, ritz_residuals, smallest_eigenpair,
                                       top_eigenpairs)
from eosrl.agents.regularisers import q_network_complexity
from eosrl.agents.thresholds import is_adaptive, stability_threshold


# ----------------------------------------------------------------------------
# The optimiser's diagonal preconditioner, read from its optax state.

_PRECONDITIONER_STATES = (optax.ScaleByAdamState, optax.ScaleByRStdDevState, optax.ScaleByRmsState)


def find_preconditioner_state(opt_state: Any) -> Any:
    """The first Adam / RMSProp moment state inside `opt_state`, wherever
    `optax.chain` (e.g. gradient clipping) nested it; None for SGD."""
    is_state = lambda node: isinstance(node, _PRECONDITIONER_STATES)
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=is_state):
        if is_state(node):
            return node
    return None


def diagonal_preconditioner(opt_state: Any, opt: OptimizerConfig) -> Optional[Any]:
    """P as a params-shaped pytree, such that the optimiser's next step is
    θ ← θ − η P⁻¹ m (m the momentum / gradient); None for SGD.

    Adam (optax.scale_by_adam with eps_root = 0, as agents.optimizers builds it):
        P = (1 − β₁ᵗ)(√ν̂ₜ + ε),  ν̂ₜ = νₜ / (1 − β₂ᵗ)
    the (1 − β₁ᵗ) moves mu's bias correction into P, so that the update is
    η P⁻¹ μₜ. t is the state's count; before the first update (t = 0) ν = 0
    and there is no preconditioner yet, so t is taken as 1.
    RMSProp (optax.scale_by_rms, eps_in_sqrt=True by default, which is what
    agents.optimizers uses): P = √(ν + ε), ε inside the root; the centred
    variant (optax.scale_by_stddev) uses the variance: P = √(ν − μ² + ε).
    """
    state = find_preconditioner_state(opt_state)
    if state is None:
        return None
    eps = opt.eps
    if isinstance(state, optax.ScaleByAdamState):
        t = jnp.maximum(state.count, 1).astype(jnp.float32)
        mu_correction = 1.0 - jnp.power(opt.b1, t)
        nu_correction = 1.0 - jnp.power(opt.b2, t)
        return jax.tree_util.tree_map(
            lambda nu: mu_correction * (jnp.sqrt(nu / nu_correction) + eps), state.nu)
    if isinstance(state, optax.ScaleByRStdDevState):
        return jax.tree_util.tree_map(
            lambda mu, nu: jnp.sqrt(nu - jnp.square(mu) + eps), state.mu, state.nu)
    return jax.tree_util.tree_map(lambda nu: jnp.sqrt(nu + eps), state.nu)


# ----------------------------------------------------------------------------
# The operator the next update sees.


def step_scaling(opt_state: Any, net_state: Any, params: Any, agent: AgentConfig) -> Optional[jnp.ndarray]:
    """D^½ as a flat vector, where the next update is θ ← θ − η D m; None when D = 1."""
    scale = None
    precond = diagonal_preconditioner(opt_state, agent.optimizer)
    if precond is not None:
        scale = 1.0 / ravel_pytree(precond)[0]
    if agent.spectral_norm.scale_lr:
        ones = jax.tree_util.tree_map(jnp.ones_like, params)
        layer_scale = ravel_pytree(spectral_norm.scale_updates(ones, net_state))[0]
        scale = layer_scale if scale is None else scale * layer_scale
    return None if scale is None else jnp.sqrt(scale)


def operator_name(agent: AgentConfig) -> str:
    """How a record names the measured operator D^½ H D^½ (see the module docstring)."""
    parts = (["S"] if agent.spectral_norm.scale_lr else []) + (["P⁻¹"] if is_adaptive(agent.optimizer) else [])
    return " ".join(parts + ["H"])


# ----------------------------------------------------------------------------
# The generic entry point: Lanczos on any scalar loss of a params pytree.


@functools.lru_cache(maxsize=32)
def _compiled_top_eigenvalues(loss_of_params: Callable, num_eigs: int, iterations: int,
                              smallest: bool) -> Callable:
    """One jitted solver per (loss function object, sizes): repeated calls with
    the same function reuse the compiled code."""

    @jax.jit
    def solve(params, rng, precond):
        flat, unravel = ravel_pytree(params)
        matvec = make_hvp(lambda x: loss_of_params(unravel(x)), flat)
        if precond is not None:
            matvec = preconditioned(matvec, jax.lax.rsqrt(ravel_pytree(precond)[0]))
        out = lanczos_eigenpairs(matvec, flat.shape[0], num_eigs, iterations, rng, 1.0, flat.dtype)
        keep = ("values", "residuals") + (("lambda_min", "lambda_min_residual") if smallest else ())
        return {key: out[key] for key in keep}

    return solve


def top_eigenvalues(loss_of_params: Callable[[Any], jnp.ndarray], params: Any, num_eigs: int,
                    iterations: int, rng: jax.Array, precond: Any = None,
                    smallest: bool = False) -> Dict[str, np.ndarray]:
    """Top eigenvalues of the Hessian of `loss_of_params` at `params`, by Lanczos.

    `precond`: optional diagonal preconditioner P (a pytree shaped like
    params, all entries > 0); the eigenvalues are then those of P⁻¹H.
    Returns numpy arrays: `values` (largest first), `residuals`
    (‖Hv − λv‖ of each), and `lambda_min`, `lambda_min_residual` when
    `smallest`. Pass the same `loss_of_params` object on every call so the
    compiled solver is reused.
    """
    solve = _compiled_top_eigenvalues(loss_of_params, int(num_eigs), int(iterations), bool(smallest))
    return jax.device_get(solve(params, rng, precond))


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
    other than the batch, the scaling of its next step, and where it stood."""
    params: Any
    target_params: Any
    net_state: Any
    target_net_state: Any
    step_scaling: Optional[jnp.ndarray]  # D^½, flat; None when the step is unscaled
    step: int
    lr: float
    env_steps: int


def _finite_or_none(x: float) -> Optional[float]:
    """JSON has no infinity: an unbounded threshold (lr = 0) is written as null."""
    return x if math.isfinite(x) else None


class Prober:
    """Measures the Hessian of a Learner's TD loss on a probe batch.

    The loss is `learner.loss_fn(params, target_params, net_state,
    target_net_state, batch, False)`: target parameters, batch and SN vectors
    are held fixed, only the online parameters vary. Batches are `Transition`s
    as the loss takes them, i.e. already through `learner.preprocess`. The
    caller owns the batch (for `probe.batch: fixed` one batch, kept with the
    run). The eigenvectors of the last probe start the next one (`lobpcg`).
    """

    def __init__(self, config: ProbeConfig, learner, seed: int = 0):
        self.config = config
        self.learner = learner
        self.agent: AgentConfig = learner.agent
        self.opt_config: OptimizerConfig = learner.agent.optimizer
        self.scaled = is_adaptive(self.opt_config) or self.agent.spectral_norm.scale_lr
        self._rng = jax.random.PRNGKey(seed)
        self._vectors: Optional[Dict[str, jnp.ndarray]] = None  # of the last probe
        self._snapshot = jax.jit(lambda s: step_scaling(s.opt_state, s.net_state, s.params, self.agent))
        self._measure = jax.jit(self._measure_fn, static_argnums=4)  # once per batch shape and kind
        self._trace = jax.jit(self._trace_fn)
        self._complexity = jax.jit(self._complexity_fn)
        self._batch_sharpness = jax.jit(self._batch_sharpness_fn)  # compiled once per (K, batch shape)

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

    def snapshot(self, state, lr: float, env_steps: int) -> ProbeSnapshot:
        """The snapshot of a learner state (on the learner's side)."""
        return ProbeSnapshot(state.params, state.target_params, state.net_state, state.target_net_state,
                             self._snapshot(state) if self.scaled else None, int(state.step), lr, env_steps)

    # -- the jitted measurements ------------------------------------------------

    def _loss_of_flat(self, snap: ProbeSnapshot, batch):
        flat, unravel = ravel_pytree(snap.params)

        def loss(x):
            return self.learner.loss_fn(unravel(x), snap.target_params, snap.net_state,
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
        k_main, k_raw, k_min = jax.random.split(rng, 3)
        scaling = snap.step_scaling
        operator = hvp if scaling is None else preconditioned(hvp, scaling)
        main = self._solve(operator, vectors["main"] if full else vectors["main"][:1], k_main)
        out = {key: main[key] for key in ("values", "residuals", "converged")}
        new_vectors = {"main": main["vectors"] if full else vectors["main"].at[:1].set(main["vectors"])}
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
        return q_network_complexity(self.learner.network, snap.params, snap.net_state, batch.obs)

    def _batch_sharpness_fn(self, snap: ProbeSnapshot, batches, init: jnp.ndarray, rng):
        """Per batch B of `batches` (K batches stacked on a leading axis), in the
        geometry of λ₁: D^½ the step's scaling (D = 1 for SGD), A_B = D^½ H_B D^½.

        - Step sharpness uᵀA_Bu/‖u‖², u = D^½g_B (= g_BᵀDH_BDg_B / g_BᵀDg_B): the
          Rayleigh quotient of the operator the step sees along the step. For SGD
          it is g_BᵀH_Bg_B/‖g_B‖², whose mean over batches is the Batch Sharpness
          of Andreyev & Beneventano (2024, arXiv:2412.20553, "Edge of Stochastic
          Stability: Revisiting the Edge of Stability for SGD"; a mean of ratios,
          as their code estimates it). In φ = D^{-½}θ the step θ ← θ − ηDg_B is
          SGD on L_B, with gradient u and Hessian A_B: their quantity for the
          step actually taken. L_B(θ − ηDg_B) ≈ L_B − η‖u‖² + ½η²uᵀA_Bu falls
          iff the step sharpness < 2/η. A batch whose gradient vanishes counts 0.
        - λ_max(A_B): `lobpcg` on one vector started from this probe's top
          eigenvector of the probe batch (so inline and prober-process probes of
          a snapshot agree), to `probe.tolerance` or `probe.iterations`:
          iterations + 2 HVPs; `lanczos`: `probe.iterations` cold steps and a
          residual, iterations + 1 HVPs.

        One batch at a time (`lax.map`): memory stays that of one batch. HVPs:
        1 + the solver's per batch (plus a gradient, not counted)."""
        c = self.config
        flat, unravel = ravel_pytree(snap.params)
        scaling = snap.step_scaling
        num = jax.tree_util.tree_leaves(batches)[0].shape[0]

        def one(args):
            batch, key = args

            def loss(x):
                return self.learner.loss_fn(unravel(x), snap.target_params, snap.net_state,
                                            snap.target_net_state, batch, False)[0]
            hvp = make_hvp(loss, flat)
            grad = jax.grad(loss)(flat)
            operator, u = (hvp, grad) if scaling is None else (preconditioned(hvp, scaling), scaling * grad)
            dot = functools.partial(jnp.vdot, precision=jax.lax.Precision.HIGHEST)  # no TF32 on GPUs
            uu = dot(u, u)
            step_sharpness = jnp.where(uu > 0, dot(u, operator(u)) / jnp.where(uu > 0, uu, 1.0), 0.0)
            if c.method == "lanczos":
                values, vectors = lanczos(operator, flat.shape[0], c.iterations, key, flat.dtype)
                value, residual = values[0], ritz_residuals(operator, values[:1], vectors[:1])[0]
                hvps = jnp.asarray(min(c.iterations, flat.shape[0]) + 1, jnp.int32)
            else:
                top = top_eigenpairs(operator, init, c.tolerance, c.iterations)
                value, residual, hvps = top["values"][0], top["residuals"][0], top["hvps"]
            converged = residual <= c.tolerance * jnp.abs(value)
            return step_sharpness, value, residual, converged, hvps + 1

        keys = jax.random.split(rng, num)
        step_sharpness, values, residuals, converged, hvps = jax.lax.map(one, (batches, keys))
        return {"step_sharpness": step_sharpness, "lambda_max": values, "residuals": residuals,
                "converged": converged, "hvps": jnp.sum(hvps)}

    def _start_vectors(self, dim: int, rng: jax.Array) -> Dict[str, jnp.ndarray]:
        """The last probe's eigenvectors, or random ones for the first probe."""
        if self._vectors is not None:
            return self._vectors
        k_main, k_raw, k_min = jax.random.split(rng, 3)
        return {"main": random_init(k_main, self.config.num_eigs, dim), "raw": random_init(k_raw, 1, dim),
                "min": random_init(k_min, 1, dim)}

    # -- the record -------------------------------------------------------------

    def probe(self, snap: ProbeSnapshot, batch, sharpness_batches: Optional[Sequence[Any]] = None,
              full: bool = True) -> Dict[str, Any]:
        """Measures `snap` on `batch`; a JSON-ready `probe` record (`full`, and `num_eigs`
        eigenvalues). With `full` False (between full probes, `is_full`) λ₁ alone: the
        record has one eigenvalue and no `raw_sharpness`, `lambda_min` or batch sharpness.

        `sharpness_batches`: K preprocessed batches of the training batch size
        (`draw_sharpness_batches`); then the record also has, over them
        (`_batch_sharpness_fn`), `batch_sharpness` (mean step sharpness) and
        `batch_lambda_max` (mean λ_max(D^½H_BD^½)), each with `_stderr` over the
        batches (0 for K = 1) and `_over_threshold`; the largest residual of the
        λ_max and whether all converged; K, the batch size, and `batch_hvps`
        (included in `hvps`). The threshold is the record's, λ₁'s: 2/η for SGD,
        where the paper finds batch sharpness settling. With momentum β it is
        (2+2β)/η (Cohen et al., 2021), which the EoSS paper does not establish
        for batch sharpness: its follow-up (arXiv:2604.14108, abstract) reports
        a plateau at 2(1+β)/η for large batches but 2(1−β)/η for small ones. For
        Adam/RMSProp the ratio is an analogue, not a published result."""
        c, step = self.config, snap.step
        start = time.perf_counter()
        rng = jax.random.fold_in(self._rng, step)
        warm = self._vectors is not None and c.method == "lobpcg"
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
        for key in ("raw_sharpness", "lambda_min", "lambda_min_residual"):
            if key in out:
                record[key] = float(out[key])
        if c.trace_every and step % c.trace_every == 0:
            trace, stderr = jax.device_get(self._trace(snap, batch, jax.random.fold_in(rng, 1)))
            record.update(trace=float(trace), trace_stderr=float(stderr))
            record["hvps"] += c.hutchinson_samples
        if c.geometric_complexity_every and step % c.geometric_complexity_every == 0:
            record["geometric_complexity"] = float(self._complexity(snap, batch))
        if sharpness_batches:
            record.update(self._batch_sharpness_record(snap, sharpness_batches, new_vectors["main"][:1],
                                                       jax.random.fold_in(rng, 2), threshold))
            record["hvps"] += record["batch_hvps"]
        record["seconds"] = time.perf_counter() - start  # the first includes compilation
        return record

    def _batch_sharpness_record(self, snap: ProbeSnapshot, batches: Sequence[Any], init: jnp.ndarray,
                                rng: jax.Array, threshold: float) -> Dict[str, Any]:
        """The batch-sharpness fields of a record (see `probe`)."""
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *batches)  # stays where preprocess put it
        out = jax.device_get(self._batch_sharpness(snap, stacked, init, rng))
        num = len(batches)
        fields: Dict[str, Any] = {"batch_sharpness_batches": num,
                                  "batch_sharpness_batch_size": int(jax.tree_util.tree_leaves(batches[0])[0].shape[0])}
        for name, key in (("batch_sharpness", "step_sharpness"), ("batch_lambda_max", "lambda_max")):
            values = np.asarray(out[key], np.float64)
            mean = float(np.mean(values))
            fields[name] = mean
            fields[f"{name}_stderr"] = float(np.std(values, ddof=1) / math.sqrt(num)) if num > 1 else 0.0
            fields[f"{name}_over_threshold"] = mean / threshold if math.isfinite(threshold) else 0.0
        fields["batch_lambda_max_residual"] = float(np.max(out["residuals"]))
        fields["batch_lambda_max_converged"] = bool(np.all(out["converged"]))
        fields["batch_hvps"] = int(out["hvps"])
        return fields
