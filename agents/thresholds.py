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
