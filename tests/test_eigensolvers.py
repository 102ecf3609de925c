"""Acceptance tests of the warm-started block eigensolver (`top_eigenpairs`,
`smallest_eigenpair`) against dense float64 references.

Two kinds of operator: the Hessian of a small relu MLP's loss (about 1.4k
parameters, so `jax.hessian` and `np.linalg.eigvalsh` give the reference), and
a dense symmetric matrix with a chosen spectrum. Everything the solver sees is
float32, as in training; every solve is jitted, as in the probe.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from eosrl.agents import eigensolvers

K = 5
TOL = 1e-3      # the project default: keeps the top 5 within REL_TOL (module docstring)
REL_TOL = 1e-3  # acceptance criterion for eigenvalues
MAX_ITERS = 100


def assert_rel_close(actual, expected, rel=REL_TOL):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    err = np.abs(actual - expected) / np.abs(expected)
    assert np.all(err < rel), f"relative errors {err} (actual {actual}, expected {expected})"


# ----------------------------------------------------------------------------
# A relu MLP's regression loss along a gradient-descent path.


def mlp_loss(seed: int = 0, sizes=(8, 32, 32, 1), batch: int = 128):
    """The loss as a function of the flat parameters, and the initial parameters."""
    rng = np.random.default_rng(seed)
    params = [(rng.normal(size=(a, b)).astype(np.float32) * np.sqrt(2.0 / a), np.zeros(b, np.float32))
              for a, b in zip(sizes[:-1], sizes[1:])]
    inputs = rng.normal(size=(batch, sizes[0])).astype(np.float32)
    targets = rng.normal(size=(batch, sizes[-1])).astype(np.float32)
    flat, unravel = ravel_pytree(params)

    def loss(x):
        h = inputs
        layers = unravel(x)
        for i, (w, b) in enumerate(layers):
            h = h @ w + b
            if i < len(layers) - 1:
                h = jax.nn.relu(h)
        return 0.5 * jnp.mean(jnp.sum((h - targets) ** 2, axis=-1))
    return loss, flat


@functools.lru_cache(maxsize=None)
def descent_path(points: int = 10, steps: int = 20, lr: float = 0.05):
    """Parameters every `steps` gradient-descent steps, each with its dense
    spectrum (descending). λ₁ moves by a few percent between points."""
    loss, x = mlp_loss()
    grad, hessian = jax.jit(jax.grad(loss)), jax.jit(jax.hessian(loss))
    path = []
    for _ in range(points):
        path.append((x, np.linalg.eigvalsh(np.asarray(hessian(x), np.float64))[::-1]))
        for _ in range(steps):
            x = x - lr * grad(x)
    return loss, path


def test_warm_started_top5_match_dense_along_descent_path():
    loss, path = descent_path()
    solve = jax.jit(lambda x, init: eigensolvers.top_eigenpairs(
        eigensolvers.make_hvp(loss, x), init, TOL, MAX_ITERS))
    init = eigensolvers.random_init(jax.random.PRNGKey(1), K, path[0][0].shape[0])
    hvps = []
    for x, spectrum in path:
        out = solve(x, init)
        init = out["vectors"]  # the next point starts from these
        assert_rel_close(out["values"], spectrum[:K])
        assert bool(np.all(out["converged"]))
        assert np.all(np.asarray(out["residuals"]) <= TOL * abs(float(out["values"][0])))
        hvps.append(int(out["hvps"]))
    cold, warm = hvps[0], hvps[1:]
    assert spectrum[0] / spectrum[K - 1] > 4  # a spread top 5: tol relative to λ₁ is strict enough
    assert max(warm) < cold and np.mean(warm) <= 0.6 * cold, f"HVPs per solve {hvps}"


# ----------------------------------------------------------------------------
# A dense matrix with a chosen spectrum.

TOP = [63.06, 62.73, 60.62, 49.93, 48.75]
LAMBDA_MIN = -58.88
DIM = 300


@functools.lru_cache(maxsize=None)
def dense_operator() -> np.ndarray:
    """Top 5 as above, a bulk in [−20, 40], and λ_min = −58.88: its largest-
    magnitude eigenvalues are not its largest."""
    rng = np.random.default_rng(0)
    spectrum = np.concatenate([TOP, rng.uniform(-20.0, 40.0, DIM - len(TOP) - 1), [LAMBDA_MIN]])
    q, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    return (q * spectrum) @ q.T


def dense_matvec():
    a = jnp.asarray(dense_operator(), jnp.float32)
    return lambda v: a @ v


def test_top_eigenpairs_are_largest_by_value():
    out = jax.jit(lambda init: eigensolvers.top_eigenpairs(dense_matvec(), init, TOL, MAX_ITERS))(
        eigensolvers.random_init(jax.random.PRNGKey(1), K, DIM))
    assert_rel_close(out["values"], TOP)
    assert bool(np.all(out["converged"]))
    vectors = np.asarray(out["vectors"], np.float64)
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(K), atol=1e-5)


def test_smallest_eigenpair_finds_negative_end():
    out = jax.jit(lambda init: eigensolvers.smallest_eigenpair(dense_matvec(), init, TOL, MAX_ITERS))(
        eigensolvers.random_init(jax.random.PRNGKey(2), 1, DIM))
    assert out["values"].shape == out["residuals"].shape == (1,) and out["vectors"].shape == (1, DIM)
    assert_rel_close(out["values"], [LAMBDA_MIN])
    assert bool(out["converged"][0]) and float(out["residuals"][0]) <= TOL * abs(LAMBDA_MIN)


def test_unconverged_pair_flagged_with_true_residual():
    a = dense_operator()
    out = jax.jit(lambda init: eigensolvers.top_eigenpairs(dense_matvec(), init, TOL, 2))(
        eigensolvers.random_init(jax.random.PRNGKey(1), K, DIM))
    assert int(out["iterations"]) == 2
    converged, residuals = np.asarray(out["converged"]), np.asarray(out["residuals"], np.float64)
    assert not converged.all()
    values, vectors = np.asarray(out["values"], np.float64), np.asarray(out["vectors"], np.float64)
    dense_residuals = np.linalg.norm(vectors @ a - values[:, None] * vectors, axis=1)
    np.testing.assert_allclose(residuals, dense_residuals, rtol=1e-3, atol=1e-5 * TOP[0])
    np.testing.assert_array_equal(converged, residuals <= TOL * abs(values[0]))
    # A unit vector's residual bounds the distance of its Rayleigh quotient to the spectrum.
    spectrum = np.linalg.eigvalsh(a)
    distance = np.min(np.abs(values[:, None] - spectrum[None, :]), axis=1)
    assert np.all(distance <= residuals * (1 + 1e-4))


def test_hvp_count_is_every_column_of_every_call():
    """`hvps` is checked against a host-side count of every vector H was applied to."""
    count = [0]

    def tally(v):
        count[0] += 1 if v.ndim == 1 else v.shape[0]

    matvec = dense_matvec()

    def counted(v):
        jax.debug.callback(tally, v)
        return matvec(v)

    out = jax.jit(lambda init: eigensolvers.top_eigenpairs(counted, init, TOL, MAX_ITERS))(
        eigensolvers.random_init(jax.random.PRNGKey(3), K, DIM))
    jax.effects_barrier()
    iterations = int(out["iterations"])
    assert 0 < iterations < MAX_ITERS
    assert int(out["hvps"]) == count[0] == K * (iterations + 2)


def test_random_init_rows_are_unit():
    x = eigensolvers.random_init(jax.random.PRNGKey(0), 3, 50)
    assert x.shape == (3, 50) and x.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(x), axis=1), 1.0, rtol=1e-5)
