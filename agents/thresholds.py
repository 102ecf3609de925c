"""Stability thresholds: the sharpness at which each optimiser's update stops
being stable on a quadratic, as tabulated in DESIGN.md.

A probe compares the measured top Hessian eigenvalue λ₁ against these values
(for adaptive optimisers, λ₁ of the preconditioned Hessian P⁻¹H):

| optimiser                       | quantity  | threshold          |
|---------------------------------|-----------|--------------------|
| SGD                             | λ₁(H)     | 2/η                |
| heavy ball (momentum β)         | λ₁(H)     | (2+2β)/η           |
| Nesterov (momentum β)           | λ₁(H)     | (2+2β)/((1+2β)η)   |
| RMSProp (no momentum)           | λ₁(P⁻¹H)  | 2/η                |
| Adam (β₁)                       | λ₁(P⁻¹H)  | (2+2β₁)/((1−β₁)η)  |

η is the learning rate *now* (the schedule's current value), so with a
decaying schedule the threshold rises over training.

With a step-size rule (agents/step_sizes.py) η is the η_t of the last update,
not an average of recent ones. The rule's η_t scales the gradient before the
momentum buffer, v ← βv + η_t g, θ ← θ − v, so v = θ_{t−1} − θ_t is the last
displacement and the update is θ_{t+1} = θ_t − η_t g_t + β(θ_t − θ_{t−1}): the
earlier steps live in the state (θ_t, θ_{t−1}), not in the map that carries it
forward. On a quadratic with eigenvalue λ that map is x_{t+1} = (1+β−η_tλ)x_t −
βx_{t−1}, the constant-step map at η_t, whose spectral radius exceeds 1 iff
λ > (2+2β)/η_t (Nesterov's likewise depends on η_t alone, in (x, v)). A
momentum-weighted average of recent steps, η_eff = (1−β)Σ_k β^k η_{t−k},
describes how far the buffer carries θ along a slowly varying gradient, not
whether the oscillation along λ grows: stepped from 0.9 to 1.1 of the threshold
step, the iterates grow at once while η_eff says stable for 6 more updates, and
stepped back down, they stop growing at once while η_eff says unstable for 6
(tests/test_step_sizes.py).
"""
from __future__ import annotations

from eosrl.agents.config import OptimizerConfig

ADAPTIVE_OPTIMIZERS = ("rmsprop", "adam")


def is_adaptive(opt: OptimizerConfig) -> bool:
    """True when the threshold applies to the preconditioned Hessian P⁻¹H."""
    return opt.name in ADAPTIVE_OPTIMIZERS


def stability_threshold(opt: OptimizerConfig, lr: float) -> float:
    """The largest stable sharpness for optimiser `opt` at learning rate `lr`."""
    if lr <= 0:
        # A zero step size is stable at any curvature (end of a linear schedule).
        return float("inf")
    if opt.name == "sgd":
        beta = opt.momentum
        if beta == 0:
            return 2.0 / lr
        if opt.nesterov:
            return (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * lr)
        return (2.0 + 2.0 * beta) / lr
    if opt.name == "rmsprop":
        return 2.0 / lr
    if opt.name == "adam":
        return (2.0 + 2.0 * opt.b1) / ((1.0 - opt.b1) * lr)
    raise ValueError(f"agent.optimizer.name: unknown optimiser {opt.name!r}")
