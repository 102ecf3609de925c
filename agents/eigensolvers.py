"""Eigensolvers on a symmetric matvec: pure, jit-compatible linear algebra that
only touches the operator H through v ↦ Hv (a Hessian-vector product, in the
probes), so H is never materialised.

- `make_hvp`, `preconditioned`: the matvecs the probes build;
- `lanczos` (full reorthogonalisation, cold start), `ritz_residuals`,
  `lanczos_eigenpairs` (Lanczos in the form of `top_eigenpairs`),
  `hutchinson_trace`;
- `top_eigenpairs`: the probe's solver, a warm-started block LOBPCG stopped on
  a residual tolerance, and `smallest_eigenpair` (the same on −H).

Why a block solver, warm-started. The probe runs every 100 updates and the
parameters move little in between, so the previous probe's Ritz vectors are
already close to the new eigenvectors. Lanczos cannot use that (one start
vector, it rebuilds the Krylov space from scratch); LOBPCG can, and it applies
H to a whole block at once (one `jax.vmap`-ed HVP per iteration).

Cost, in single-vector HVPs (what `hvps` reports): k·(iterations + 2): k for
the start block, k per iteration (the new residual directions; H·X and H·P are
kept up to date by linear combination, never recomputed), and k for the final
check of the reported residuals. Extra unreported "guard" vectors were tried
and left out: on a spectrum with λ₅ = 48.75, λ₆ = 48.6 (tol 1e-3) 2 guards took
a cold start from 140 to 117 HVPs but warm starts from 35-40 to 47-54.

Tolerance. A residual r bounds the eigenvalue error by r, and by about r²/gap
once converged; tol is relative to |λ₁|, so λ_k of a spread spectrum gets less.
tol = 1e-3 is the one that kept all top-5 eigenvalues within 1e-3 (relative) of
the dense ones in the tests' relu MLP (λ₁/λ₅ ≈ 6; 3e-3 reached 9e-4, 1e-2 3e-3).

Why not `jax.experimental.sparse.linalg.lobpcg_standard` (jax 0.4.34), which
solves the same problem: measured on the Hessians of 1377-parameter tanh and
relu MLP regression losses (float32, tol 1e-3, top 5, 10 solves each started
from the last along a gradient-descent path; HVPs ours vs library): tanh cold
45 vs 170, warm 20-30 vs 70-90; relu cold 60 vs 270, warm 20-30 vs 70-90, all
within 1e-3 of the dense eigenvalues. The library
spends 4k HVPs per iteration (it applies H to the whole [X, P, R] basis, then to
X again, where H·X and H·P are known by linear combination), it cannot stop on
our criterion (its test is per pair, r < tol·10·n·(θ + ‖Hv‖), so the closest
translation, tol/(20n), is stricter for every pair below λ₁), and it returns no
residuals (k more HVPs). It did not break down in float32 at these tolerances;
its design (SVQB, and P orthogonalised in coefficient space) is the one used here.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Tuple

import jax
import jax.numpy as jnp

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
# Lanczos, residuals, trace (cold start, one vector at a time).


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


def ritz_residuals(matvec: Matvec, values: jnp.ndarray, vectors: jnp.ndarray) -> jnp.ndarray:
    """‖Hv − λv‖ for each (λ, v), one matvec each (`lax.map`: one at a time, so
    memory stays that of a single HVP). Vectors are unit norm, so this is also
    a bound on the distance of λ to the spectrum."""
    def residual(pair):
        lam, v = pair
        return jnp.linalg.norm(matvec(v) - lam * v)
    return jax.lax.map(residual, (values, vectors))


def lanczos_eigenpairs(matvec: Matvec, dim: int, num_eigs: int, iterations: int, rng: jax.Array,
                       tol: float, dtype=jnp.float32) -> Dict[str, jnp.ndarray]:
    """Top-k of `iterations` Lanczos steps, plus the bottom Ritz pair (λ_min for free), in
    the keys of `eigensolvers.top_eigenpairs`; residuals cost one matvec per reported pair."""
    values, vectors = lanczos(matvec, dim, iterations, rng, dtype)
    num = min(num_eigs, values.shape[0])
    top = {"values": values[:num], "vectors": vectors[:num]}
    top["residuals"] = ritz_residuals(matvec, top["values"], top["vectors"])
    top["converged"] = top["residuals"] <= tol * jnp.abs(top["values"][0])
    top["hvps"] = jnp.asarray(min(iterations, dim) + num + 1, jnp.int32)
    low_residual = ritz_residuals(matvec, values[-1:], vectors[-1:])
    top["lambda_min"], top["lambda_min_residual"] = values[-1], low_residual[0]
    return top


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


# ----------------------------------------------------------------------------
# Warm-started block eigensolver (LOBPCG).

# Products of [b, dim] blocks at full float32 precision: on GPUs the default
# precision of a float32 matmul may be TF32 (~1e-3), too coarse to keep a
# basis orthonormal.
_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _row_norms(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.linalg.norm(x, axis=1)


def _unit_rows(x: jnp.ndarray) -> jnp.ndarray:
    """Rows scaled to unit norm; zero rows stay zero."""
    norms = _row_norms(x)
    return x / jnp.where(norms > 0, norms, 1.0)[:, None]


def random_init(rng: jax.Array, num: int, dim: int, dtype=jnp.float32) -> jnp.ndarray:
    """[num, dim] random start rows for a cold start (Gaussian, unit norm)."""
    return _unit_rows(jax.random.normal(rng, (num, dim), dtype))


def _orthonormaliser(x: jnp.ndarray, symmetric: bool = False) -> jnp.ndarray:
    """T such that the rows of T @ x are orthonormal (SVQB, Stathopoulos & Wu 2002):
    from the eigendecomposition of the small Gram matrix, so the [b, dim] work is
    one product. Directions of x that are numerically dependent (Gram eigenvalue
    below 1e3·eps of the largest) are dropped: their rows of T are zero, not noise
    amplified by 1/√eps. `symmetric` (Löwdin, G^{-1/2}) keeps each row as close to
    its input row as possible: used on Ritz vectors, whose order matters."""
    norms = _row_norms(x)
    inv_norms = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
    unit = x * inv_norms[:, None]
    w, u = jnp.linalg.eigh(_mm(unit, unit.T))
    keep = w > 1e3 * jnp.finfo(x.dtype).eps * w[-1]
    scale = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, w, 1.0)), 0.0)
    t = (u * scale).T
    if symmetric:
        t = _mm(u, t)
    return t * inv_norms[None, :]


def _complement(w: jnp.ndarray, basis: jnp.ndarray) -> jnp.ndarray:
    """Orthonormal rows spanning the part of span(w) orthogonal to the rows of
    `basis` (orthonormal or zero); rows of w that lie (numerically) in the span
    of `basis` become zero. Near convergence the residuals are tiny and nearly
    inside span(X): a row keeps only if at least 10% of it is outside, so its
    normalisation amplifies rounding at most tenfold."""
    for _ in range(2):  # "twice is enough", for the projection and the SVQB
        w = _unit_rows(w)
        for _ in range(2):
            w = w - _mm(_mm(w, basis.T), basis)
        w = jnp.where((_row_norms(w) > 0.1)[:, None], w, 0.0)
        w = _mm(_orthonormaliser(w), w)
    return w


def _rayleigh_ritz(s: jnp.ndarray, hs: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Ritz values (descending) and coefficient vectors (columns) of H on the
    span of the rows of s (orthonormal or zero), given hs = H s row by row.
    A zero row would add a spurious Ritz value 0, which could outrank true
    negative eigenvalues: it is pushed below the whole spectrum instead."""
    m = _mm(s, hs.T)
    m = 0.5 * (m + m.T)
    live = _row_norms(s) > 0.5
    m = jnp.where(live[:, None] & live[None, :], m, 0.0)
    m = m + jnp.diag(jnp.where(live, 0.0, -2.0 * jnp.linalg.norm(m) - jnp.finfo(m.dtype).tiny))
    w, v = jnp.linalg.eigh(m)
    return w[::-1], v[:, ::-1]


class _Block(NamedTuple):
    x: jnp.ndarray         # [b, dim] Ritz vectors, orthonormal rows, descending values
    hx: jnp.ndarray        # H x, kept by linear combination
    p: jnp.ndarray         # [b, dim] previous search directions (orthonormal or zero rows)
    hp: jnp.ndarray
    values: jnp.ndarray    # [b] Ritz values
    residuals: jnp.ndarray  # [b] ‖Hx − λx‖ from hx (estimates; the final check is explicit)
    iterations: jnp.ndarray


def _ritz_block(x, hx, p, hp, iterations) -> _Block:
    """Re-orthonormalises x (rounding drifts over iterations), then p against x,
    applying each transform to the H-images too, and measures the residuals."""
    t = _orthonormaliser(x, symmetric=True)
    x, hx = _mm(t, x), _mm(t, hx)
    overlap = _mm(p, x.T)
    p, hp = p - _mm(overlap, x), hp - _mm(overlap, hx)
    t = _orthonormaliser(p)
    p, hp = _mm(t, p), _mm(t, hp)
    values = jnp.sum(x * hx, axis=1)
    residuals = _row_norms(hx - values[:, None] * x)
    return _Block(x, hx, p, hp, values, residuals, iterations)


def _start(block_matvec: Matvec, init: jnp.ndarray) -> _Block:
    """The block from init's rows: Householder QR gives orthonormal rows even if
    init is rank deficient, then Rayleigh-Ritz on them."""
    x = jnp.linalg.qr(init.T)[0].T
    hx = block_matvec(x)
    _, c = _rayleigh_ritz(x, hx)
    zeros = jnp.zeros_like(x)
    return _ritz_block(_mm(c.T, x), _mm(c.T, hx), zeros, zeros, jnp.zeros((), jnp.int32))


def _iterate(block_matvec: Matvec, st: _Block) -> _Block:
    """One LOBPCG step: Rayleigh-Ritz on span[X, W, P], W the residual directions
    (the only new HVPs). The new P spans what took the old X to the new X,
    orthogonal to the new X, computed in the small coefficient space, which keeps
    the basis well conditioned near convergence (Hetmaniuk & Lehoucq 2006)."""
    b = st.x.shape[0]
    r = st.hx - st.values[:, None] * st.x
    w = _complement(r, jnp.concatenate([st.x, st.p]))
    s = jnp.concatenate([st.x, w, st.p])
    hs = jnp.concatenate([st.hx, block_matvec(w), st.hp])
    _, q = _rayleigh_ritz(s, hs)
    c = q[:, :b]
    y = _mm(q[:, b:], jnp.linalg.qr(q[:b, b:].T)[0])
    return _ritz_block(_mm(c.T, s), _mm(c.T, hs), _mm(y.T, s), _mm(y.T, hs), st.iterations + 1)


def top_eigenpairs(matvec: Matvec, init: jnp.ndarray, tol: float, max_iters: int) -> Dict[str, jnp.ndarray]:
    """Top-k eigenpairs BY VALUE (largest algebraic first, never by magnitude) of
    the symmetric operator `matvec` (v ↦ Hv on one flat vector; batched here with
    `jax.vmap`), by LOBPCG started from the k rows of `init` [k, dim] (the
    previous call's vectors, or `random_init` for a cold start).

    Stops once every reported pair has ‖Hv − λv‖ ≤ tol·|λ₁| or after `max_iters`
    block iterations. `tol`, `max_iters` and the shapes are static.
    Returns values [k] (descending), vectors [k, dim] (orthonormal rows),
    residuals [k] (true ‖Hv − λv‖ of the returned pairs, from k explicit HVPs),
    converged [k] (residual ≤ tol·|λ₁|), iterations and hvps (int32 scalars;
    hvps counts every column of every batched call: k·(iterations + 2)).
    """
    k, dim = init.shape
    if 3 * k > dim:
        raise ValueError(f"top_eigenpairs: needs 3·k ≤ dim (k = {k}, dim = {dim})")
    block_matvec = jax.vmap(matvec)

    def unconverged(st: _Block) -> jnp.ndarray:
        return jnp.logical_and(st.iterations < max_iters,
                               jnp.any(st.residuals[:k] > tol * jnp.abs(st.values[0])))

    st = jax.lax.while_loop(unconverged, lambda st: _iterate(block_matvec, st),
                            _start(block_matvec, init))
    x = st.x[:k]
    hx = block_matvec(x)
    values = jnp.sum(x * hx, axis=1)
    order = jnp.argsort(-values)  # explicit Rayleigh quotients can swap near-ties
    values, x, hx = values[order], x[order], hx[order]
    residuals = _row_norms(hx - values[:, None] * x)
    return {"values": values, "vectors": x, "residuals": residuals,
            "converged": residuals <= tol * jnp.abs(values[0]),
            "iterations": st.iterations,
            "hvps": (k * (st.iterations + 2)).astype(jnp.int32)}


def smallest_eigenpair(matvec: Matvec, init: jnp.ndarray, tol: float, max_iters: int) -> Dict[str, jnp.ndarray]:
    """λ_min of H with its vector: `top_eigenpairs` of −H from init [1, dim], the
    values negated back; same keys, values/vectors/residuals of length 1. The
    tolerance is relative to |λ_min|."""
    out = top_eigenpairs(lambda v: -matvec(v), init, tol, max_iters)
    return {**out, "values": -out["values"]}
