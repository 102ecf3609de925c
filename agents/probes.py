"""Hessian probes: the sharpness of the TD loss, measured against the optimiser's
stability threshold, plus a few cheaper curvature-related quantities.

Everything here works on the parameters raveled into one flat vector
(`jax.flatten_util.ravel_pytree`) and touches the Hessian H only through
Hessian-vector products computed forward-over-reverse (`jax.jvp` of
`jax.grad`), so H is never materialised: one HVP costs about two gradients.

Layers, from the bottom up:

- pure, jit-compatible linear algebra on a `matvec` (v ↦ Hv):
  `lanczos` (full reorthogonalisation), `power_iteration` (top-k by
  deflation), `ritz_residuals`, `hutchinson_trace`, and `eigenpairs`, which
  combines them into the numbers a probe reports;
- `diagonal_preconditioner`, which reads P from the optimiser's real optax
  state, so adaptive optimisers are measured on P^{-1/2} H P^{-1/2} (similar
  to P⁻¹H, hence the same eigenvalues, but symmetric so Lanczos applies);
- `geometric_complexity` of the Q-network (Dherin et al., 2022);
- `top_eigenvalues(loss_of_params, params, ...)`: the generic entry point,
  for any scalar loss of a params pytree (used by the supervised benchmark);
- `Prober`: the learner-side instrument that writes `probe` records.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from eosrl.agents import networks
from eosrl.agents.config import OptimizerConfig, ProbeConfig
from eosrl.agents.thresholds import is_adaptive, stability_threshold

Matvec = Callable[[jnp.ndarray], jnp.ndarray]


# ----------------------------------------------------------------------------
# Hessian-vector products.


def make_hvp(loss_of_flat: Callable[[jnp.ndarray], jnp.ndarray], x: jnp.ndarray) -> Matvec:
    """v ↦ H(x) v for a scalar function of a flat vector, forward-over-reverse."""
    grad_fn = jax.grad(loss_of_flat)
    return lambda v: jax.jvp(grad_fn, (x,), (v,))[1]


def preconditioned(matvec: Matvec, inv_sqrt_p: jnp.ndarray) -> Matvec:
    """v ↦ P^{-1/2} H P^{-1/2} v for a diagonal P given as the vector P^{-1/2}."""
    return lambda v: inv_sqrt_p * matvec(inv_sqrt_p * v)


# ----------------------------------------------------------------------------
# Eigensolvers on a symmetric matvec.


def _orthogonalise(w: jnp.ndarray, basis: jnp.ndarray) -> jnp.ndarray:
    """Removes the span of the rows of `basis` (orthonormal or zero) from w.
    Two passes of classical Gram-Schmidt: one pass loses orthogonality in
    float32, two are enough (Parlett's "twice is enough")."""
    w = w - basis.T @ (basis @ w)
    return w - basis.T @ (basis @ w)


def _unit(w: jnp.ndarray) -> jnp.ndarray:
    return w / jnp.linalg.norm(w)


def lanczos(matvec: Matvec, dim: int, num_iters: int, rng: jax.Array,
            dtype=jnp.float32) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Lanczos with full reorthogonalisation.

    Returns all `m = min(num_iters, dim)` Ritz values, sorted largest first,
    and the matching Ritz vectors as rows of an [m, dim] array. `num_iters`
    must be static; the loop is a `fori_loop`, so it compiles once.

    Without reorthogonalisation, rounding makes converged eigenvalues reappear
    as spurious copies; keeping every basis vector (m·dim memory) and
    projecting against all of them avoids that.
    """
    m = min(int(num_iters), int(dim))
    v0 = _unit(jax.random.normal(rng, (dim,), dtype))
    basis = jnp.zeros((m + 1, dim), dtype).at[0].set(v0)
    alphas = jnp.zeros((m,), dtype)
    betas = jnp.zeros((m,), dtype)
    # β below this (relative to the largest |α| or β seen) means the Krylov
    # space is invariant: w is rounding noise and must not become a basis vector.
    rel_tol = 100.0 * jnp.finfo(dtype).eps

    def body(i, carry):
        basis, alphas, betas, scale = carry
        v = basis[i]
        w = matvec(v)
        alpha = jnp.vdot(v, w)
        # Projecting out all basis vectors (unfilled rows are zero) also
        # removes the α·v_i and β·v_{i-1} terms of the three-term recurrence.
        w = _orthogonalise(w, basis)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.maximum(jnp.abs(alpha), beta))
        breakdown = beta <= rel_tol * scale
        # On breakdown, restart with a fresh random direction orthogonal to the
        # basis and zero coupling in T: the Ritz values stay exact for the
        # invariant block and the search continues in the complement.
        fresh = jax.random.normal(jax.random.fold_in(rng, i + 1), (dim,), dtype)
        fresh = _unit(_orthogonalise(fresh, basis))
        next_v = jnp.where(breakdown, fresh, w / jnp.where(breakdown, 1.0, beta))
        beta = jnp.where(breakdown, 0.0, beta)
        basis = basis.at[i + 1].set(next_v)
        return basis, alphas.at[i].set(alpha), betas.at[i].set(beta), scale

    basis, alphas, betas, _ = jax.lax.fori_loop(
        0, m, body, (basis, alphas, betas, jnp.zeros((), dtype)))
    tridiag = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    theta, s = jnp.linalg.eigh(tridiag)           # ascending
    ritz_vectors = s.T @ basis[:m]                # row j pairs with theta[j]
    return theta[::-1], ritz_vectors[::-1]


def power_iteration(matvec: Matvec, dim: int, num_eigs: int, num_iters: int,
                    rng: jax.Array, dtype=jnp.float32) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Top-k eigenpairs by power iteration with deflation (H − Σ λᵢuᵢuᵢᵀ).

    Power iteration converges to the eigenvalue of largest *magnitude*; near a
    minimum H's spectrum is dominated by its positive outliers, so this is the
    top of the spectrum in practice. Results are sorted largest first.
    Cost: num_eigs·(num_iters + 1) matvecs.
    """
    found_vecs = jnp.zeros((num_eigs, dim), dtype)
    found_vals = jnp.zeros((num_eigs,), dtype)

    def one_eigenpair(j, carry):
        vals, vecs = carry

        def deflated(v):
            return matvec(v) - vecs.T @ (vals * (vecs @ v))

        def step(_, v):
            return _unit(deflated(v))

        v = _unit(jax.random.normal(jax.random.fold_in(rng, j), (dim,), dtype))
        v = jax.lax.fori_loop(0, num_iters, step, v)
        lam = jnp.vdot(v, deflated(v))  # Rayleigh quotient
        return vals.at[j].set(lam), vecs.at[j].set(v)

    vals, vecs = jax.lax.fori_loop(0, num_eigs, one_eigenpair, (found_vals, found_vecs))
    order = jnp.argsort(-vals)
    return vals[order], vecs[order]


def ritz_residuals(matvec: Matvec, values: jnp.ndarray, vectors: jnp.ndarray) -> jnp.ndarray:
    """‖Hv − λv‖ for each (λ, v), one matvec each (`lax.map`: one at a time, so
    memory stays that of a single HVP). Vectors are unit norm, so this is also
    a bound on the distance of λ to the spectrum."""
    def residual(pair):
        lam, v = pair
        return jnp.linalg.norm(matvec(v) - lam * v)
    return jax.lax.map(residual, (values, vectors))


def hutchinson_trace(matvec: Matvec, dim: int, num_samples: int, rng: jax.Array,
                     dtype=jnp.float32) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Hutchinson's estimate of tr(H) from Rademacher probes zᵀHz, with its
    standard error (sample std / √n; 0 for a single sample)."""
    def quadratic_form(key):
        z = jax.random.rademacher(key, (dim,), dtype)
        return jnp.vdot(z, matvec(z))
    samples = jax.lax.map(quadratic_form, jax.random.split(rng, num_samples))
    stderr = jnp.std(samples, ddof=1) / jnp.sqrt(num_samples) if num_samples > 1 else 0.0
    return jnp.mean(samples), jnp.asarray(stderr, dtype)


def eigenpairs(matvec: Matvec, dim: int, num_eigs: int, iterations: int, rng: jax.Array,
               method: str = "lanczos", smallest: bool = False,
               dtype=jnp.float32) -> Dict[str, jnp.ndarray]:
    """Top-k eigenvalues (largest first) with their Ritz residuals and, if asked,
    the smallest eigenvalue. Jit-compatible; all sizes must be static.

    `lanczos` spends `iterations` matvecs and finds both ends of the spectrum
    at once; `power` spends `iterations` per eigenvalue (and as many again for
    the smallest, by power iteration on λ₁I − H). Residuals cost one extra
    matvec per reported pair.
    """
    k_top, k_min = jax.random.split(rng)
    if method == "lanczos":
        values, vectors = lanczos(matvec, dim, iterations, k_top, dtype)
        num = min(num_eigs, values.shape[0])
        out = {"values": values[:num], "vectors": vectors[:num]}
        low_value, low_vector = values[-1], vectors[-1]
    elif method == "power":
        values, vectors = power_iteration(matvec, dim, num_eigs, iterations, k_top, dtype)
        out = {"values": values, "vectors": vectors}
        if smallest:
            # Shift by the largest-magnitude eigenvalue found, so λ₁I − H is
            # positive semi-definite and its top eigenvector is H's bottom one.
            shift = jnp.max(jnp.abs(values))
            shifted_vals, shifted_vecs = power_iteration(
                lambda v: shift * v - matvec(v), dim, 1, iterations, k_min, dtype)
            low_value, low_vector = shift - shifted_vals[0], shifted_vecs[0]
    else:
        raise ValueError(f"probe.method: unknown method {method!r} (valid: lanczos, power)")
    out["residuals"] = ritz_residuals(matvec, out["values"], out["vectors"])
    if smallest:
        out["lambda_min"] = low_value
        out["lambda_min_residual"] = ritz_residuals(matvec, low_value[None], low_vector[None])[0]
    return out


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
# Geometric complexity of the Q-network.


def geometric_complexity(q_of_inputs: Callable[[jnp.ndarray], jnp.ndarray],
                         inputs: jnp.ndarray) -> jnp.ndarray:
    """Mean over the batch of ‖∂q(x_b)/∂x_b‖²_F (Dherin et al., 2022).

    `q_of_inputs` maps a batch [B, ...] to [B, A] with no interaction between
    rows (true of these networks: no batch norm), so the gradient of
    Σ_b q[b, a] w.r.t. the whole batch holds every row's Jacobian row a.
    That costs A backward passes instead of B·A.
    """
    q, vjp = jax.vjp(q_of_inputs, inputs)
    num_rows, num_actions = q.shape

    def squared_norm_of_column(a):
        (g,) = vjp(jax.nn.one_hot(jnp.full((num_rows,), a), num_actions, dtype=q.dtype))
        return jnp.sum(jnp.square(g))

    return jnp.sum(jax.lax.map(squared_norm_of_column, jnp.arange(num_actions))) / num_rows


def network_inputs(obs: jnp.ndarray) -> jnp.ndarray:
    """The float input the network actually sees: uint8 frames scaled to [0, 1]
    (as `networks.make_network` does), so the Jacobian is w.r.t. that."""
    if obs.dtype == jnp.uint8:
        return obs.astype(jnp.float32) / 255.0
    return obs.astype(jnp.float32)


# ----------------------------------------------------------------------------
# Generic entry point: any scalar loss of a params pytree.


def _flat_inv_sqrt(precond: Any) -> jnp.ndarray:
    flat, _ = ravel_pytree(precond)
    return jax.lax.rsqrt(flat)


@functools.lru_cache(maxsize=32)
def _compiled_top_eigenvalues(loss_of_params: Callable, num_eigs: int, iterations: int,
                              method: str, smallest: bool) -> Callable:
    """One jitted solver per (loss function object, sizes): repeated calls with
    the same function reuse the compiled code."""

    @jax.jit
    def solve(params, rng, precond):
        flat, unravel = ravel_pytree(params)
        matvec = make_hvp(lambda x: loss_of_params(unravel(x)), flat)
        if precond is not None:
            matvec = preconditioned(matvec, _flat_inv_sqrt(precond))
        out = eigenpairs(matvec, flat.shape[0], num_eigs, iterations, rng, method, smallest,
                         flat.dtype)
        del out["vectors"]
        return out

    return solve


def top_eigenvalues(loss_of_params: Callable[[Any], jnp.ndarray], params: Any, num_eigs: int,
                    iterations: int, rng: jax.Array, precond: Any = None,
                    method: str = "lanczos", smallest: bool = False) -> Dict[str, np.ndarray]:
    """Top eigenvalues of the Hessian of `loss_of_params` at `params`.

    `precond`: optional diagonal preconditioner P (a pytree shaped like
    params, all entries > 0); the eigenvalues are then those of P⁻¹H.
    Returns numpy arrays: `values` (largest first), `residuals`
    (‖Hv − λv‖ of each), and `lambda_min`, `lambda_min_residual` when
    `smallest`. Pass the same `loss_of_params` object on every call so the
    compiled solver is reused.
    """
    solve = _compiled_top_eigenvalues(loss_of_params, int(num_eigs), int(iterations), method,
                                      bool(smallest))
    return jax.device_get(solve(params, rng, precond))


# ----------------------------------------------------------------------------
# The learner-side instrument.


def _finite_or_none(x: float) -> Optional[float]:
    """JSON has no infinity: an unbounded threshold (lr = 0) is written as null."""
    return x if math.isfinite(x) else None


class Prober:
    """Measures the Hessian of a Learner's TD loss on a probe batch.

    The loss is `learner.loss_fn(params, target_params, net_state,
    target_net_state, batch, False)`: target parameters, batch and the SN
    vectors are held fixed, only the online parameters vary. Batches are
    `Transition`s as the loss takes them, i.e. already through
    `learner.preprocess` (the Prober does not apply it again). The caller
    owns the batch: for `probe.batch: fixed` it draws one when learning
    starts, passes it every time and keeps it in its checkpoints.
    """

    def __init__(self, config: ProbeConfig, learner, seed: int = 0):
        self.config = config
        self.learner = learner
        self.opt_config: OptimizerConfig = learner.agent.optimizer
        self.adaptive = is_adaptive(self.opt_config)
        self._rng = jax.random.PRNGKey(seed)
        self._measure = jax.jit(self._measure_fn)  # compiled once per batch shape

    def should_probe(self, step: int) -> bool:
        """Probe every `config.every` learner updates (not before the first:
        an adaptive optimiser has no preconditioner until it has seen a gradient)."""
        return self.config.enabled and step > 0 and step % self.config.every == 0

    # -- the jitted measurement ----------------------------------------------

    def _measure_fn(self, state, batch, rng) -> Dict[str, jnp.ndarray]:
        c = self.config
        learner = self.learner
        flat, unravel = ravel_pytree(state.params)
        dim, dtype = flat.shape[0], flat.dtype

        def loss_of_flat(x):
            return learner.loss_fn(unravel(x), state.target_params, state.net_state,
                                   state.target_net_state, batch, False)[0]

        hvp = make_hvp(loss_of_flat, flat)
        k_eig, k_raw, k_trace = jax.random.split(rng, 3)
        out: Dict[str, jnp.ndarray] = {}
        if self.adaptive:
            inv_sqrt_p = _flat_inv_sqrt(diagonal_preconditioner(state.opt_state, self.opt_config))
            main = eigenpairs(preconditioned(hvp, inv_sqrt_p), dim, c.num_eigs, c.iterations,
                              k_eig, c.method, c.smallest, dtype)
            raw = eigenpairs(hvp, dim, 1, c.iterations, k_raw, c.method, False, dtype)
            out["raw_sharpness"] = raw["values"][0]
        else:
            main = eigenpairs(hvp, dim, c.num_eigs, c.iterations, k_eig, c.method, c.smallest,
                              dtype)
        out["eigenvalues"] = main["values"]
        out["residuals"] = main["residuals"]
        if c.smallest:
            out["lambda_min"] = main["lambda_min"]
            out["lambda_min_residual"] = main["lambda_min_residual"]
        out["trace"], out["trace_stderr"] = hutchinson_trace(hvp, dim, c.hutchinson_samples,
                                                             k_trace, dtype)
        out["grad_norm"] = jnp.linalg.norm(jax.grad(loss_of_flat)(flat))
        out["param_norm"] = jnp.linalg.norm(flat)

        def q_of_inputs(x):
            output, _ = learner.network.apply(state.params, state.net_state, x, False)
            return networks.q_values(learner.network, output)

        out["geometric_complexity"] = geometric_complexity(q_of_inputs, network_inputs(batch.obs))
        return out

    # -- the record -------------------------------------------------------------

    def probe(self, batch) -> Dict[str, Any]:
        """Measures now on `batch` and returns a JSON-ready `probe` record."""
        step = self.learner.step
        start = time.perf_counter()
        out = jax.device_get(self._measure(self.learner.state, batch,
                                           jax.random.fold_in(self._rng, step)))
        seconds = time.perf_counter() - start  # includes compilation on the first call
        lr = self.learner.current_lr()
        threshold = stability_threshold(self.opt_config, lr)
        eigenvalues = [float(v) for v in out["eigenvalues"]]
        sharpness = eigenvalues[0]
        record = {
            "kind": "probe",
            "step": step,
            "method": self.config.method,
            "preconditioned": self.adaptive,
            "eigenvalues": eigenvalues,
            "residuals": [float(r) for r in out["residuals"]],
            "sharpness": sharpness,
            "lr": lr,
            "threshold": _finite_or_none(threshold),
            "sharpness_over_threshold": sharpness / threshold if math.isfinite(threshold) else 0.0,
            "grad_norm": float(out["grad_norm"]),
            "param_norm": float(out["param_norm"]),
            "trace": float(out["trace"]),
            "trace_stderr": float(out["trace_stderr"]),
            "geometric_complexity": float(out["geometric_complexity"]),
            "seconds": seconds,
        }
        if self.adaptive:
            record["raw_sharpness"] = float(out["raw_sharpness"])
        if self.config.smallest:
            record["lambda_min"] = float(out["lambda_min"])
            record["lambda_min_residual"] = float(out["lambda_min_residual"])
        return record
