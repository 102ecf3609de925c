"""Spectral normalisation per layer (Gogianu et al., 2021; Miyato et al., 2018).

A selected layer uses W/σ (`divide`), W/max(1, σ) (`clip`) or W itself while
σ is measured (`log`). σ comes from power iteration with persistent vectors
kept in haiku state: they and the logged σ change only when the learner asks
(`update_sn=True`); acting and evaluating return the state they were given.
The parameter names are the same as those of the plain layer (`<layer>/w`,
`<layer>/b`), and the vectors do not draw from haiku's key sequence, so the
same seed gives the same weights with SN on or off, and checkpoints, probes
and optimisers do not depend on whether SN is on.
"""
from __future__ import annotations

import zlib
from typing import Dict, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from eosrl.agents.config import SpectralNormConfig
from eosrl.agents.layers import resolve_layers

_EPS = 1e-12
# Power-iteration steps when a network is created, so that σ is converged before the
# first learner update: from a random vector one step left σ 43 % low on a MinAtar
# conv layer (1.035 against 1.817), and `divide`/`clip` networks acted with that.
INIT_POWER_ITERATIONS = 500


def _normalize(x: jnp.ndarray) -> jnp.ndarray:
    return x / (jnp.linalg.norm(x) + _EPS)


def _initial_vector(name: str):
    """Initialiser of a layer's power-iteration vector: a random unit vector.

    The key is derived from the layer name instead of `hk.next_rng_key()`:
    drawing from haiku's key sequence would shift the keys of every later
    layer, so the same seed would give different weights with SN on and off
    (SN comparisons would then also compare initialisations). The vector is
    unit norm because σ = ‖W u‖ is only σ for a unit `u`; an unnormalised
    start made σ wrong by a factor ‖u‖ ≈ √n until the first learner update,
    which changed what `divide`/`clip` networks computed while acting.
    """
    key = jax.random.PRNGKey(zlib.crc32(name.encode()))

    def init(shape, dtype):
        return _normalize(jax.random.normal(key, shape, dtype))
    return init


def power_iteration_matrix(w: jnp.ndarray, u: jnp.ndarray, steps: int):
    """Advances the right singular vector estimate `u` of the matrix `w` [in, out]."""
    for _ in range(steps):
        v = _normalize(w @ u)
        u = _normalize(w.T @ v)
    return u


def matrix_sigma(w: jnp.ndarray, u: jnp.ndarray) -> jnp.ndarray:
    """σ ≈ ‖W u‖ / ‖u‖ with `u` held fixed (gradients flow through W only, as in Miyato et al.).

    Dividing by ‖u‖ keeps σ a lower bound of the true norm even for a vector that
    was never normalised (a state written by an older version of this module).
    """
    u = jax.lax.stop_gradient(u)
    return jnp.linalg.norm(w @ u) / (jnp.linalg.norm(u) + _EPS)


# The DQN (Mnih et al., 2015) and MinAtar (Young & Tian, 2019) networks use unpadded convolutions.
CONV_PADDING = "VALID"


def conv_operator(w: jnp.ndarray, stride: int, padding: str = CONV_PADDING):
    """The linear map x ↦ conv(x, w), as haiku's Conv2D applies it with `padding`."""
    def op(x):
        return jax.lax.conv_general_dilated(
            x, w, window_strides=(stride, stride), padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return op


def power_iteration_operator(op, u: jnp.ndarray, steps: int):
    """Power iteration through a linear operator and its transpose (via VJP)."""
    for _ in range(steps):
        v, vjp = jax.vjp(op, u)
        v = _normalize(v)
        (u,) = vjp(v)
        u = _normalize(u)
    return u


def operator_sigma(op, u: jnp.ndarray) -> jnp.ndarray:
    """σ ≈ ‖op(u)‖ / ‖u‖ with `u` held fixed, as `matrix_sigma` for a linear operator."""
    u = jax.lax.stop_gradient(u)
    return jnp.linalg.norm(op(u)) / (jnp.linalg.norm(u) + _EPS)


class _SNLayer(hk.Module):
    """Shared logic of the normalised dense and conv layers."""

    def __init__(self, config: SpectralNormConfig, update: bool, name: str):
        super().__init__(name=name)
        self.config, self.update = config, update

    def _vector(self, shape, power_step) -> jnp.ndarray:
        """The power-iteration vector, advanced by `power_step` (u ↦ u') and stored:
        `config.power_iterations` times in a learner update, to convergence at init."""
        u = hk.get_state("u", shape, jnp.float32, init=_initial_vector(self.module_name))
        if hk.running_init():
            u = jax.lax.fori_loop(0, INIT_POWER_ITERATIONS, lambda _, x: power_step(x), u)
        elif self.update:
            for _ in range(self.config.power_iterations):
                u = power_step(u)
        else:
            return u
        u = jax.lax.stop_gradient(u)
        hk.set_state("u", u)
        return u

    def _scale(self, sigma: jnp.ndarray) -> jnp.ndarray:
        # The logged σ is written only by learner updates: acting and evaluating
        # must return the state unchanged (σ of the acting weights, which the
        # learner has moved since, would otherwise overwrite the learner's
        # value). At init the entry is created so the state structure is fixed.
        logged = jax.lax.stop_gradient(sigma)
        if self.update:
            hk.set_state("sigma", logged)
        else:
            hk.get_state("sigma", (), jnp.float32, init=lambda *_: logged)
        if self.config.mode == "divide":
            # The floor only matters for an all-zero weight, where W/σ would be NaN.
            return 1.0 / jnp.maximum(sigma, _EPS)
        if self.config.mode == "clip":
            return 1.0 / jnp.maximum(1.0, sigma)
        return jnp.ones_like(sigma)  # log: measure only


class SNLinear(_SNLayer):
    """hk.Linear with a spectrally normalised weight; same parameters, plus state `u`, `sigma`."""

    def __init__(self, width: int, w_init, config: SpectralNormConfig, update: bool, name: str):
        super().__init__(config, update, name)
        self.width, self.w_init = width, w_init

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        w = hk.get_parameter("w", (x.shape[-1], self.width), x.dtype, init=self.w_init)
        b = hk.get_parameter("b", (self.width,), x.dtype, init=jnp.zeros)
        u = self._vector((self.width,), lambda x: power_iteration_matrix(w, x, 1))
        scale = self._scale(matrix_sigma(w, u))
        return x @ (w * scale) + b


class SNConv2D(_SNLayer):
    """hk.Conv2D (NHWC, VALID padding) with a spectrally normalised kernel; same parameters.

    σ is that of the kernel reshaped to [k·k·in, out] (`conv: reshape`) or the
    operator norm of the convolution on this layer's input shape (`conv: operator`).
    """

    def __init__(self, channels: int, kernel: int, stride: int, w_init,
                 config: SpectralNormConfig, update: bool, name: str):
        super().__init__(config, update, name)
        self.channels, self.kernel, self.stride = channels, kernel, stride
        self.w_init = w_init

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        shape = (self.kernel, self.kernel, x.shape[-1], self.channels)
        w = hk.get_parameter("w", shape, x.dtype, init=self.w_init)
        b = hk.get_parameter("b", (self.channels,), x.dtype, init=jnp.zeros)
        if self.config.conv == "operator":
            op = conv_operator(w, self.stride)
            # The operator norm depends on the input's spatial size, fixed at init.
            u = self._vector((1,) + x.shape[1:], lambda v: power_iteration_operator(op, v, 1))
            sigma = operator_sigma(op, u)
        else:
            matrix = w.reshape(-1, self.channels)
            u = self._vector((self.channels,), lambda v: power_iteration_matrix(matrix, v, 1))
            sigma = matrix_sigma(matrix, u)
        scale = self._scale(sigma)
        return conv_operator(w * scale, self.stride)(x) + b


class LayerSelector:
    """Builds each named layer, spectrally normalised when the config selects it."""

    def __init__(self, config: SpectralNormConfig, layer_names: Sequence[str]):
        self.config = config
        self.selected = resolve_layers(config.layers, layer_names)

    def linear(self, name: str, width: int, w_init, update: bool):
        if name in self.selected:
            return SNLinear(width, w_init, self.config, update, name=name)
        return hk.Linear(width, w_init=w_init, name=name)

    def conv(self, name: str, channels: int, kernel: int, stride: int, w_init, update: bool):
        if name in self.selected:
            return SNConv2D(channels, kernel, stride, w_init, self.config, update, name=name)
        return hk.Conv2D(channels, kernel, stride=stride, padding=CONV_PADDING, w_init=w_init, name=name)


def sigmas(net_state: Dict) -> Dict[str, jnp.ndarray]:
    """σ of every normalised or logged layer, keyed `sn_sigma/<layer>`."""
    return {f"sn_sigma/{layer}": values["sigma"]
            for layer, values in net_state.items() if "sigma" in values}


def scale_updates(updates: Dict, net_state: Dict) -> Dict:
    """The step-size ablation: each SN layer's optimiser update (its effective
    learning rate) divided by max(1, σ). Scaling the update rather than the
    gradient keeps the ablation meaningful for Adam, whose step ignores a
    slowly varying gradient scale."""
    scaled = dict(updates)
    for layer, values in net_state.items():
        if "sigma" in values and layer in updates:
            factor = 1.0 / jnp.maximum(1.0, values["sigma"])
            scaled[layer] = jax.tree_util.tree_map(lambda g: g * factor, updates[layer])
    return scaled
