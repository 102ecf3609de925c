"""Readings a probe takes beside the eigenvalues of the TD loss's Hessian: the pure
matvecs and splits of the loss that `Prober` (agents/probes.py) jits and hands to its
eigensolver, each tested against a dense reference in tests/test_readings.py.

- `td_loss_parts`: the TD loss as ℓ(f(θ)), f the online network's outputs on the
  batch's observations and ℓ the agent kind's loss of those outputs, with the target
  network's outputs and the bootstrap selector held fixed (as `make_loss_fn` holds them:
  stop-gradient). What the Gauss–Newton matrix and the kind's `loss_diagnostics`
  (e.g. the fraction of TD errors beyond Huber's δ) are made of;
- `gauss_newton_matvec`: v ↦ Jᵀ ∇²ℓ J v, the Gauss–Newton part of the Hessian
  (H = G + Σ_o ∂ℓ/∂f_o ∇²f_o), by a jvp of f, an HVP of ℓ in output space and a vjp;
- `layer_matvecs`: per layer (one haiku module's parameters), the diagonal block of
  the Hessian, as an HVP of the loss of that layer's parameters alone;
- `dataset_index`, `gather_batch`, `dataset_hvp`: the Hessian of the mean loss over a
  dataset's transitions (agents/offline.py), HVPs accumulated over fixed-size chunks.

Why each reading, with its references: docs/design.md, "Readings of the loss and its
curvature".
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from eosrl.agents.eigensolvers import Matvec, make_hvp, preconditioned
from eosrl.agents.types import Transition


# ----------------------------------------------------------------------------
# The TD loss as ℓ(f(θ)).


def td_loss_parts(network: Any, agent: Any, params: Any, target_params: Any, net_state: Any,
                  target_net_state: Any, batch: Transition) -> Tuple[Callable[[Any], jax.Array], Tuple]:
    """(outputs, targets): `outputs(params)` is the online network's output on `batch.obs`
    [B, *head_shape] (SN vectors fixed, as the probes' loss holds them) and
    `network.agent_kind.loss(outputs(params), *targets)` is the learner's TD loss
    (`make_loss_fn`) at `params`: `targets` = (actions, rewards, discounts, the target
    network's outputs on `next_obs`, the bootstrap selector), all constants."""
    kind = network.agent_kind
    out_t_target = jax.lax.stop_gradient(network.apply(target_params, target_net_state, batch.next_obs, False)[0])
    if agent.double_q:
        q_t_selector = kind.q_values(network.apply(params, net_state, batch.next_obs, False)[0])
    else:
        q_t_selector = kind.q_values(out_t_target)
    targets = (batch.action.astype(jnp.int32), batch.reward, batch.discount, out_t_target,
               jax.lax.stop_gradient(q_t_selector))

    def outputs(p):
        return network.apply(p, net_state, batch.obs, False)[0]

    return outputs, targets


def gauss_newton_matvec(outputs_of_flat: Callable[[jax.Array], jax.Array],
                        loss_of_outputs: Callable[[jax.Array], jax.Array], flat: jax.Array) -> Matvec:
    """v ↦ Jᵀ ∇²ℓ J v at `flat`, J = ∂f/∂θ, ∇²ℓ the Hessian of ℓ in output space: one
    jvp, one output-space HVP and one vjp per product (f linearised once). G is
    positive semi-definite when ℓ is convex in the outputs (C51's cross-entropy, the
    Huber losses)."""
    out, f_jvp = jax.linearize(outputs_of_flat, flat)
    f_vjp = jax.linear_transpose(f_jvp, flat)
    loss_hvp = make_hvp(loss_of_outputs, out)
    return lambda v: f_vjp(loss_hvp(f_jvp(v)))[0]


# ----------------------------------------------------------------------------
# Per-layer diagonal blocks.


def layer_matvecs(loss_of_params: Callable[[Any], jax.Array], params: Dict[str, Any],
                  scaling: Any = None) -> Dict[str, Tuple[Matvec, jax.Array]]:
    """{layer: (matvec, its flat parameters)} for each top-level entry of `params` (one
    haiku module's weights): v ↦ H_ll v, the Hessian of the loss in that layer's
    parameters with the others held, i.e. the diagonal block of H (the block of Hv for
    v zero outside the layer), in the layer's own coordinates. `scaling`: D^½ as a flat
    vector over all parameters (`preconditioning.step_scaling`), or None; the block is then that
    of D^½HD^½, D_l^½ H_ll D_l^½."""
    _, unravel = ravel_pytree(params)
    scales = None if scaling is None else unravel(scaling)
    out = {}
    for name in params:
        block, unravel_block = ravel_pytree(params[name])

        def loss_of_block(x, name=name, unravel_block=unravel_block):
            return loss_of_params({**params, name: unravel_block(x)})

        matvec = make_hvp(loss_of_block, block)
        if scales is not None:
            matvec = preconditioned(matvec, ravel_pytree(scales[name])[0])
        out[name] = (matvec, block)
    return out


# ----------------------------------------------------------------------------
# The loss over a dataset.


def dataset_index(size: int, count: int, seed: int) -> np.ndarray:
    """The items a dataset reading uses: all `size` when `count` is 0 or ≥ size, else
    `count` drawn uniformly without replacement, from `seed` (the run's: the same items
    in every probe of a run and after a resume), sorted. int32."""
    if not count or count >= size:
        return np.arange(size, dtype=np.int32)
    rng = np.random.default_rng([int(seed), 0xDA7A])
    return np.sort(rng.choice(size, size=count, replace=False)).astype(np.int32)


def gather_batch(data: Any, index: jax.Array) -> Transition:
    """The `Transition`s of items `index` of a `DeviceDataset` (agents/offline.py), decoded
    as the learner decodes sampled ones (`offline.sample`)."""
    first = data.starts[index]
    return data.layout.to_transition({"rows": data.rows[first[:, None] + jnp.arange(data.layout.window)]})


def dataset_hvp(loss_of_flat_on: Callable[[jax.Array, Transition], jax.Array], flat: jax.Array, data: Any,
                index: jax.Array, chunk: int) -> Matvec:
    """v ↦ H v, H the Hessian of the mean loss over the items `index` [n] of `data`: the
    items in chunks of `chunk` (the last one shorter), each chunk's HVP of its mean loss
    weighted by its size, (Σ_c n_c H_c v)/n. One chunk's batch lives at a time (a
    `lax.scan` over the full chunks); `loss_of_flat_on(x, batch)` is a mean over the batch."""
    n = int(index.shape[0])
    full = n // chunk
    rest = n - full * chunk

    def chunk_hvp(idx, v):
        batch = gather_batch(data, idx)
        return make_hvp(lambda x: loss_of_flat_on(x, batch), flat)(v)

    def matvec(v):
        total = jnp.zeros_like(flat)
        if full:
            chunks = index[:full * chunk].reshape(full, chunk)
            total, _ = jax.lax.scan(lambda acc, idx: (acc + chunk_hvp(idx, v), None), total, chunks)
            total = chunk * total
        if rest:
            total = total + rest * chunk_hvp(index[full * chunk:], v)
        return total / n

    return matvec


__all__ = ["dataset_hvp", "dataset_index", "gather_batch", "gauss_newton_matvec", "layer_matvecs",
           "td_loss_parts"]
