"""Tests of spectral normalisation (agents/spectral_norm.py) against exact linear algebra.

σ estimates are compared with `numpy.linalg.svd` of the weight matrix, of the
reshaped kernel, or of a convolution's explicit matrix; modes are checked
through the layer's outputs (not through the module's own σ), and the state
plumbing through the real networks and the Learner (acting, checkpoints,
metrics, the step-size ablation). Learning tests live elsewhere.
"""
from __future__ import annotations

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eosrl.agents import spectral_norm
from eosrl.agents.config import AgentConfig, ConfigError, OptimizerConfig, SpectralNormConfig
from eosrl.agents.learner import Learner, Transition
from eosrl.agents.networks import make_network

REL = 1e-3
W_INIT = hk.initializers.VarianceScaling(1.0, "fan_avg", "uniform")
NETS = {  # env kind -> (obs shape, obs dtype); the network is chosen from the env kind.
    "gym": ((4,), np.float32),
    "minatar": ((10, 10, 4), np.float32),
    "atari": ((84, 84, 4), np.uint8),
}


def agent_config(layers="none", mode="log", conv="reshape", iters=1, scale_lr=False, **kw):
    sn = SpectralNormConfig(layers=layers, mode=mode, power_iterations=iters, conv=conv,
                            scale_lr=scale_lr)
    return AgentConfig(spectral_norm=sn, hidden_sizes=[64, 64], **kw)


def network(env_kind, num_actions=3, **kw):
    return make_network(agent_config(**kw), env_kind, NETS[env_kind][0], num_actions)


def observations(env_kind, batch=5, seed=1):
    shape, dtype = NETS[env_kind]
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return rng.integers(0, 256, (batch,) + shape, dtype=np.uint8)
    return rng.normal(size=(batch,) + shape).astype(np.float32)


def iterate(net, params, state, obs, times):
    """`times` learner-style applies (update_sn=True); returns the state after them.

    Tests use one power iteration per apply, as training does, and many cheap
    jitted applies: unrolling many iterations per apply costs more to compile
    than running them."""
    step = jax.jit(functools.partial(net.apply, update_sn=True))
    for _ in range(times):
        _, state = step(params, state, obs)
    return state


def top_sv(matrix) -> float:
    return float(np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)[0])


def tree_equal(a, b) -> bool:
    same = jax.tree_util.tree_map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
        jax.tree_util.tree_leaves(same))


def conv_matrix(w, stride, in_shape):
    """Explicit matrix of x ↦ conv(x, w) (VALID, no bias), by applying the plain haiku
    Conv2D to every basis vector of the input: row i is the image of e_i."""
    kernel, _, _, channels = w.shape
    conv = hk.without_apply_rng(hk.transform(
        lambda x: hk.Conv2D(channels, kernel, stride=stride, padding="VALID", name="c")(x)))
    n = int(np.prod(in_shape))
    basis = np.eye(n, dtype=np.float32).reshape((n,) + tuple(in_shape))
    params = {"c": {"w": jnp.asarray(w), "b": jnp.zeros((channels,), jnp.float32)}}
    return np.asarray(conv.apply(params, basis)).reshape(n, -1)


def layer_transform(kind, config, update, **layer_kw):
    """A single SN layer as a haiku transform (for output- and Jacobian-level checks)."""
    def f(x):
        if kind == "dense":
            return spectral_norm.SNLinear(layer_kw["width"], W_INIT, config, update, name="l")(x)
        return spectral_norm.SNConv2D(layer_kw["channels"], layer_kw["kernel"], layer_kw["stride"],
                                      W_INIT, config, update, name="l")(x)
    return hk.without_apply_rng(hk.transform_with_state(f))


def converged_layer(kind, config, x, steps, params=None, **layer_kw):
    """(params, state, apply without update) of a layer whose vector has had `steps` updates."""
    learn = layer_transform(kind, config, True, **layer_kw)
    act = layer_transform(kind, config, False, **layer_kw)
    init_params, state = learn.init(jax.random.PRNGKey(0), x)
    params = init_params if params is None else params
    step = jax.jit(learn.apply)
    for _ in range(steps):
        _, state = step(params, state, x)
    return params, state, act.apply


# ----------------------------------------------------------------------------
# σ against exact singular values


def test_dense_sigma_matches_svd_through_network():
    net = network("gym", layers="all")
    params, state = net.init(jax.random.PRNGKey(0))
    state = iterate(net, params, state, observations("gym"), 200)
    assert set(state) == {"dense_0", "dense_1", "head"}
    for layer in state:
        exact = top_sv(params[layer]["w"])
        assert abs(float(state[layer]["sigma"]) - exact) / exact < REL, layer


def test_conv_reshape_sigma_matches_svd_of_reshaped_kernel():
    # The MinAtar network: conv_0 is 3x3x4x16, reshaped to [36, 16]; dense_0 is [1600, 128].
    net = network("minatar", layers="all", conv="reshape")
    params, state = net.init(jax.random.PRNGKey(0))
    state = iterate(net, params, state, observations("minatar"), 400)
    w = np.asarray(params["conv_0"]["w"])
    exact = top_sv(w.reshape(-1, w.shape[-1]))
    assert abs(float(state["conv_0"]["sigma"]) - exact) / exact < REL
    for layer in ("dense_0", "head"):
        exact = top_sv(params[layer]["w"])
        assert abs(float(state[layer]["sigma"]) - exact) / exact < REL, layer


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_operator_sigma_matches_explicit_matrix(stride):
    config = SpectralNormConfig(layers="all", mode="log", conv="operator")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 5, 2)), jnp.float32)
    params, state, _ = converged_layer("conv", config, x, 200, channels=3, kernel=3, stride=stride)
    exact = top_sv(conv_matrix(params["l"]["w"], stride, (5, 5, 2)))
    assert abs(float(state["l"]["sigma"]) - exact) / exact < REL
    # The reshaped kernel's σ is a different number: the test does tell them apart.
    w = np.asarray(params["l"]["w"])
    assert abs(top_sv(w.reshape(-1, 3)) - exact) / exact > 10 * REL
    # The functions on their own agree with the layer.
    op = spectral_norm.conv_operator(params["l"]["w"], stride)
    assert np.isclose(float(spectral_norm.operator_sigma(op, state["l"]["u"])),
                      float(state["l"]["sigma"]), rtol=1e-5)


def test_conv_operator_through_minatar_network():
    # The 10x10 operator's top singular values are clustered, so one iteration per
    # update converges slowly (relative error 1e-3 after ~60 updates, 4e-4 after 800).
    net = network("minatar", layers="conv_0", conv="operator")
    params, state = net.init(jax.random.PRNGKey(0))
    assert state["conv_0"]["u"].shape == (1, 10, 10, 4)
    state = iterate(net, params, state, observations("minatar"), 800)
    exact = top_sv(conv_matrix(params["conv_0"]["w"], 1, (10, 10, 4)))
    assert abs(float(state["conv_0"]["sigma"]) - exact) / exact < REL


def test_matrix_functions_directly():
    w = jnp.asarray(np.random.default_rng(3).normal(size=(30, 7)), jnp.float32)
    u = spectral_norm.power_iteration_matrix(w, jnp.ones((7,)) / np.sqrt(7), 300)
    assert abs(float(spectral_norm.matrix_sigma(w, u)) - top_sv(w)) / top_sv(w) < REL


# ----------------------------------------------------------------------------
# Modes, judged by what the layer computes


def test_divide_dense_effective_weight_has_unit_norm():
    config = SpectralNormConfig(layers="all", mode="divide")
    x = jnp.ones((1, 20), jnp.float32)
    params, state, apply = converged_layer("dense", config, x, 200, width=12)
    assert top_sv(params["l"]["w"]) > 1.2  # the raw weight is not already normalised
    f = lambda v: apply(params, state, v[None])[0][0]
    jac = np.asarray(jax.jacfwd(f)(jnp.zeros((20,))))  # [out, in]: exactly the effective weight
    assert abs(top_sv(jac) - 1.0) < REL
    # And the bias is untouched: output at 0 is b.
    np.testing.assert_allclose(np.asarray(f(jnp.zeros((20,)))), np.asarray(params["l"]["b"]))


@pytest.mark.parametrize("stride", [1, 2])
def test_divide_conv_operator_has_unit_operator_norm(stride):
    config = SpectralNormConfig(layers="all", mode="divide", conv="operator")
    x = jnp.zeros((1, 5, 5, 2), jnp.float32)
    params, state, apply = converged_layer("conv", config, x, 0, channels=3, kernel=3, stride=stride)
    params = {"l": {"w": params["l"]["w"] * 4.0, "b": params["l"]["b"] + 0.5}}  # σ well above 1
    _, state, apply = converged_layer("conv", config, x, 200, params=params,
                                      channels=3, kernel=3, stride=stride)
    bias_out = apply(params, state, x)[0]
    f = lambda v: (apply(params, state, v.reshape(x.shape))[0] - bias_out).reshape(-1)
    jac = np.asarray(jax.jacfwd(f)(jnp.zeros((50,))))
    assert abs(top_sv(jac) - 1.0) < REL


def test_divide_conv_reshape_equals_kernel_over_its_reshaped_norm():
    config = SpectralNormConfig(layers="all", mode="divide", conv="reshape")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 2)), jnp.float32)
    params, state, apply = converged_layer("conv", config, x, 200, channels=3, kernel=3, stride=1)
    w = np.asarray(params["l"]["w"])
    plain = hk.without_apply_rng(hk.transform(
        lambda v: hk.Conv2D(3, 3, padding="VALID", name="l")(v)))
    expected = plain.apply({"l": {"w": w / top_sv(w.reshape(-1, 3)), "b": params["l"]["b"]}}, x)
    np.testing.assert_allclose(np.asarray(apply(params, state, x)[0]), np.asarray(expected),
                               rtol=2 * REL, atol=1e-6)


def _scale_layer(params, layer, target_sigma):
    params = jax.tree_util.tree_map(lambda a: a, params)
    w = params[layer]["w"]
    params[layer] = dict(params[layer], w=w * (target_sigma / top_sv(w)))
    return params


def test_clip_leaves_small_layers_unchanged_and_shrinks_large_ones():
    obs = observations("gym")
    plain = network("gym")
    clip = network("gym", layers="all", mode="clip")
    params, state = clip.init(jax.random.PRNGKey(0))
    # Every layer with σ < 1: the clipped network is the plain network, exactly.
    small = params
    for layer in ("dense_0", "dense_1", "head"):
        small = _scale_layer(small, layer, 0.5)
    st = iterate(clip, small, state, obs, 10)
    out_clip, _ = clip.apply(small, st, obs, False)
    out_plain, _ = plain.apply(small, {}, obs, False)
    np.testing.assert_array_equal(np.asarray(out_clip), np.asarray(out_plain))
    # dense_1 with σ = 3: the clipped network is the plain one with dense_1's weight / 3.
    large = _scale_layer(small, "dense_1", 3.0)
    st = iterate(clip, large, state, obs, 200)
    assert abs(float(st["dense_1"]["sigma"]) - 3.0) < 3.0 * REL
    out_clip, _ = clip.apply(large, st, obs, False)
    out_shrunk, _ = plain.apply(_scale_layer(large, "dense_1", 1.0), {}, obs, False)
    out_unclipped, _ = plain.apply(large, {}, obs, False)
    np.testing.assert_allclose(np.asarray(out_clip), np.asarray(out_shrunk), rtol=2 * REL, atol=1e-5)
    assert not np.allclose(np.asarray(out_clip), np.asarray(out_unclipped), rtol=0.1)


@pytest.mark.parametrize("conv", ["reshape", "operator"])
def test_log_mode_equals_plain_network_and_reports_sigma(conv):
    obs = observations("minatar")
    plain = network("minatar")
    logged = network("minatar", layers="all", mode="log", conv=conv)
    params, state = logged.init(jax.random.PRNGKey(0))
    plain_params, plain_state = plain.init(jax.random.PRNGKey(0))
    # Same parameter names, and the same initial weights for the same seed.
    assert plain_state == {}
    assert tree_equal(params, plain_params)
    expected, _ = plain.apply(params, {}, obs, False)
    for update in (False, True):
        out, new_state = logged.apply(params, state, obs, update)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
        for layer in logged.layer_names:
            sigma = float(new_state[layer]["sigma"])
            assert np.isfinite(sigma) and sigma > 0, layer


# ----------------------------------------------------------------------------
# State plumbing: acting, checkpoints, Learner metrics


def random_batch(env_kind, batch=8, num_actions=3, seed=0):
    rng = np.random.default_rng(seed)
    return Transition(
        obs=observations(env_kind, batch, seed), next_obs=observations(env_kind, batch, seed + 1),
        action=rng.integers(0, num_actions, batch).astype(np.int32),
        reward=rng.normal(size=batch).astype(np.float32),
        discount=np.full(batch, 0.99, np.float32))


def make_learner(env_kind="gym", num_actions=3, seed=0, **kw):
    agent = agent_config(**kw)
    net = make_network(agent, env_kind, NETS[env_kind][0], num_actions)
    return Learner(net, agent, seed=seed)


@pytest.mark.parametrize("env_kind,layers,conv,mode", [
    ("gym", "-2", "reshape", "divide"),
    ("minatar", "all", "operator", "clip"),
])
def test_state_survives_checkpoint_and_is_unchanged_by_acting(tmp_path, env_kind, layers, conv, mode):
    learner = make_learner(env_kind, layers=layers, conv=conv, mode=mode)
    net = learner.network
    obs = observations(env_kind, 4, seed=7)
    _, state0 = learner.acting_params()
    assert tree_equal(net.apply(learner.state.params, state0, obs, False)[1], state0)
    batch = random_batch(env_kind)
    for _ in range(3):
        metrics = learner.update(batch)
    params, state = learner.acting_params()
    assert not tree_equal(state, state0)  # the learner did advance the vectors
    # Acting (update_sn=False) returns exactly the state it was given, even though
    # the acting weights are not those σ was last measured on.
    _, acted = net.apply(params, state, obs, False)
    assert tree_equal(acted, state)
    # Checkpoint → fresh learner (other seed, so its own state differs) → identical state.
    path = learner.save(tmp_path)
    other = make_learner(env_kind, seed=1, layers=layers, conv=conv, mode=mode)
    assert not tree_equal(other.state.params, learner.state.params)
    other.restore(path)
    assert tree_equal(other.state.net_state, learner.state.net_state)
    assert tree_equal(other.state.target_net_state, learner.state.target_net_state)
    assert tree_equal(other.state.params, learner.state.params)
    # Resumed training continues exactly as uninterrupted training would.
    m1, m2 = learner.update(batch), other.update(batch)
    assert tree_equal(other.state.net_state, learner.state.net_state)
    for key in (k for k in metrics if k.startswith("sn_sigma/")):
        assert float(m1[key]) == float(m2[key])


def test_learner_update_reports_sigma_of_selected_layers():
    learner = make_learner("minatar", layers="-2,-3")
    metrics = learner.update(random_batch("minatar"))
    assert {k for k in metrics if k.startswith("sn_sigma/")} == {"sn_sigma/conv_0", "sn_sigma/dense_0"}
    for key in ("sn_sigma/conv_0", "sn_sigma/dense_0"):
        assert np.isfinite(float(metrics[key])) and float(metrics[key]) > 0
    plain = make_learner("minatar")
    assert not any(k.startswith("sn_sigma/") for k in plain.update(random_batch("minatar")))


@pytest.mark.parametrize("optimizer", [OptimizerConfig(name="sgd", lr=1.0),
                                       OptimizerConfig(name="adam", lr=1e-3)], ids=["sgd", "adam"])
def test_scale_lr_divides_layer_step_by_max_one_sigma(optimizer):
    # log mode: the loss and its gradient are those of the plain network, so two
    # learners differing only in scale_lr take the same optimiser step except that
    # the selected layers' step is divided by max(1, σ) -- for Adam too, whose step
    # would ignore a scaled gradient.
    sgd = optimizer
    batch = random_batch("gym")
    runs = {}
    for scale_lr in (False, True):
        learner = make_learner("gym", layers="dense_1,head", mode="log",
                               scale_lr=scale_lr, optimizer=sgd)
        before = learner.state.params
        metrics = learner.update(batch)
        delta = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b),
                                       before, learner.state.params)
        runs[scale_lr] = (delta, metrics)
    (plain, m_plain), (scaled, m_scaled) = runs[False], runs[True]
    assert float(m_plain["loss"]) == float(m_scaled["loss"])
    sigma = {layer: float(m_scaled[f"sn_sigma/{layer}"]) for layer in ("dense_1", "head")}
    assert sigma["dense_1"] > 1.2  # the factor is not trivially 1
    for layer, s in sigma.items():
        for name in ("w", "b"):
            np.testing.assert_allclose(scaled[layer][name], plain[layer][name] / max(1.0, s),
                                       rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(scaled["dense_0"]["w"], plain["dense_0"]["w"])  # not selected


def test_scale_updates_function():
    grads = {"a": {"w": jnp.full((2, 2), 6.0)}, "b": {"w": jnp.full((2,), 6.0)}, "c": {"w": jnp.ones(2)}}
    state = {"a": {"sigma": jnp.asarray(3.0)}, "b": {"sigma": jnp.asarray(0.5)}}
    out = spectral_norm.scale_updates(grads, state)
    np.testing.assert_allclose(out["a"]["w"], 2.0)
    np.testing.assert_allclose(out["b"]["w"], 6.0)  # σ < 1: unchanged
    np.testing.assert_allclose(out["c"]["w"], 1.0)  # not an SN layer


def test_scale_lr_with_divide_or_clip_mode_is_refused_with_one_line():
    # divide's W/σ (clip's W/max(1, σ)) already divides the layer's gradient by σ > 1: scale_lr
    # would divide the step twice.
    from conftest import CONFIGS
    from eosrl.launch.config import load_config
    sets = ["agent.spectral_norm.layers=-2", "agent.spectral_norm.scale_lr=true"]
    with pytest.raises(ConfigError, match=r"agent\.spectral_norm\.scale_lr: .*mode divide.*set mode log") as err:
        load_config(CONFIGS / "dqn_cartpole.yaml", [*sets, "agent.spectral_norm.mode=divide"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="agent.spectral_norm.scale_lr"):  # divide is the default mode
        load_config(CONFIGS / "dqn_cartpole.yaml", sets)
    with pytest.raises(ConfigError, match=r"agent\.spectral_norm\.scale_lr: .*mode clip"):
        load_config(CONFIGS / "dqn_cartpole.yaml", [*sets, "agent.spectral_norm.mode=clip"])
    config = load_config(CONFIGS / "dqn_cartpole.yaml", [*sets, "agent.spectral_norm.mode=log"])
    assert config.agent.spectral_norm.scale_lr


# ----------------------------------------------------------------------------
# Layer selection


MINATAR = ("conv_0", "dense_0", "head")
NATURE = ("conv_0", "conv_1", "conv_2", "dense_0", "head")


@pytest.mark.parametrize("env_kind,spec,expected", [
    ("minatar", "-2", {"dense_0"}),
    ("atari", "-2,-3", {"conv_2", "dense_0"}),
    ("atari", " -3 , -2 ", {"conv_2", "dense_0"}),
    ("minatar", "all", set(MINATAR)),
    ("atari", "full", set(NATURE)),
    ("atari", "conv_0,head", {"conv_0", "head"}),
    ("minatar", "none", set()),
    ("gym", "-1", {"head"}),
])
def test_layer_selection_on_real_networks(env_kind, spec, expected):
    net = network(env_kind, layers=spec)
    # The selection is visible as which layers carry SN state (nothing else does).
    _, state = net.init(jax.random.PRNGKey(0))
    assert set(state) == expected
    assert set(spectral_norm.resolve_layers(spec, net.layer_names)) == expected


def test_resolve_layers_keeps_network_order():
    assert spectral_norm.resolve_layers("-2,-3", NATURE) == ("conv_2", "dense_0")
    assert spectral_norm.resolve_layers("head,-2,head", MINATAR) == ("dense_0", "head")


@pytest.mark.parametrize("spec", ["-4", "1", "0", "-0", "dense_7", "-2,", "penultimate"])
def test_bad_layer_raises_config_error_listing_layers(spec):
    with pytest.raises(ConfigError) as err:
        network("minatar", layers=spec)
    message = str(err.value)
    assert "agent.spectral_norm.layers" in message
    assert "conv_0, dense_0, head" in message


@pytest.mark.parametrize("conv", ["reshape", "operator"])
def test_initial_sigma_is_converged_before_any_update(conv):
    # Before the first learner update actors already use σ (divide/clip). The
    # estimate must be a true lower bound, which needs a unit vector (a raw normal
    # draw overestimated σ by ~‖u‖ ≈ √n), and converged: one step from a random
    # vector gave 1.035 for a conv layer whose σ is 1.817.
    net = network("minatar", layers="all", conv=conv, mode="divide")
    params, state = net.init(jax.random.PRNGKey(0))
    for layer in net.layer_names:
        u = np.asarray(state[layer]["u"])
        assert abs(np.linalg.norm(u) - 1.0) < 1e-5, layer
        w = np.asarray(params[layer]["w"])
        if w.ndim == 2:
            exact = top_sv(w)
        elif conv == "reshape":
            exact = top_sv(w.reshape(-1, w.shape[-1]))
        else:
            exact = top_sv(conv_matrix(w, 1, (10, 10, 4)))
        assert exact * (1 - 1e-3) <= float(state[layer]["sigma"]) <= exact * (1 + 1e-5), layer
