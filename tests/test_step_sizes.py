"""Stability-aware step sizes and curvature penalties (agents/step_sizes.py,
agents/regularisers.py): each rule against a hand-computed case on a quadratic, the
penalty's gradient against finite differences, the threshold following η_t, and
short training runs that write both."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import enable_x64

from eosrl.agents import networks, regularisers, step_sizes
from eosrl.agents.config import AgentConfig, ConfigError, OptimizerConfig, ProbeConfig
from eosrl.launch.config import load_config
from eosrl.agents.learner import Learner, Transition
from eosrl.agents.optimizers import make_optimizer
from eosrl.agents.probes import Prober
from eosrl.agents.thresholds import stability_threshold
from conftest import CONFIGS

A = np.array([[3.0, 1.0], [1.0, 2.0]], np.float32)  # a 2-D quadratic f(x) = ½xᵀAx with known Hessian A
X = np.array([1.0, -2.0], np.float32)


def quadratic(x):
    return 0.5 * x @ (A @ x)


def test_corridor_step_is_polyak_on_a_quadratic():
    g = A @ X                                   # (1, -3)
    f = 0.5 * X @ A @ X                         # ½(1·1 + (−2)(−3)) = 3.5
    assert f == pytest.approx(3.5) and g @ g == pytest.approx(10.0)
    eta = step_sizes.corridor(jnp.asarray(f), jnp.asarray(g), scale=0.5, max_lr=1.0)
    assert float(eta) == pytest.approx(0.5 * 3.5 / 10.0)                  # c·f/‖g‖² = 0.175
    assert float(step_sizes.corridor(jnp.asarray(f), jnp.asarray(g), 0.5, max_lr=0.1)) == pytest.approx(0.1)
    assert float(step_sizes.corridor(jnp.asarray(f), jnp.zeros(2), 0.5, max_lr=0.1)) == pytest.approx(0.1)
    # optax's Polyak scaling takes the same step (c = 1): its update is -η·g.
    polyak = optax.scale_by_polyak(max_learning_rate=10.0)
    update, _ = polyak.update(jnp.asarray(g), polyak.init(jnp.asarray(X)), value=jnp.asarray(f))
    eta_one = step_sizes.corridor(jnp.asarray(f), jnp.asarray(g), scale=1.0, max_lr=10.0)
    np.testing.assert_allclose(update, eta_one * g, rtol=1e-6)


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_drift_adjusted_step_on_a_2d_quadratic(power):
    g = A @ X
    hg = step_sizes.hessian_gradient_product(quadratic, jnp.asarray(X), jnp.asarray(g))
    np.testing.assert_allclose(hg, A @ A @ X, rtol=1e-6)               # H g = A²x = (0, −5)
    drift = np.linalg.norm(A @ A @ X) / np.linalg.norm(A @ X)          # 5/√10
    eta = step_sizes.drift_adjusted(jnp.asarray(g), hg, power, max_lr=10.0)
    assert float(eta) == pytest.approx(2.0 / drift ** power, rel=1e-6)
    assert float(step_sizes.drift_adjusted(jnp.asarray(g), hg, power, max_lr=0.1)) == pytest.approx(0.1)


def test_drift_adjusted_step_along_an_eigenvector_is_two_over_its_eigenvalue():
    values, vectors = np.linalg.eigh(A)
    x = vectors[:, 1].astype(np.float32)                # eigenvalue λ = values[1]
    g = A @ x
    hg = step_sizes.hessian_gradient_product(quadratic, jnp.asarray(x), jnp.asarray(g))
    eta = step_sizes.drift_adjusted(jnp.asarray(g), hg, 1.0, max_lr=10.0)
    assert float(eta) == pytest.approx(2.0 / values[1], rel=1e-5)


def test_drift_adjusted_lengthens_the_step_past_lr_as_the_authors_code_does():
    # dal.py (deepmind/discretisation_drift): the gradient times clip(1/(static_lr·v^p/2), 0, 5/static_lr),
    # then a step of static_lr: η_t = min(2/v^p, 5) whatever static_lr (our `lr`) is.
    x, g = jnp.asarray(X), jnp.asarray(A @ X)
    loss = jnp.asarray(quadratic(X))
    drift = 5.0 / np.sqrt(10.0)                          # ‖A²x‖/‖Ax‖ = 5/√10 ≈ 1.58

    def eta(**fields):
        config = OptimizerConfig(name="sgd", lr=0.1, momentum=0.8, step_size_rule="drift_adjusted", **fields)
        return float(step_sizes.step_size(config, quadratic, x, loss, g))

    def authors(static_lr, power, max_lr_scale=5.0):
        return static_lr * np.clip(1.0 / (static_lr * drift ** power / 2.0), 0.0, max_lr_scale / static_lr)

    assert OptimizerConfig().dal_max_lr == 5.0                              # their max_lr_scale
    assert eta() == pytest.approx(2.0 * np.sqrt(10.0) / 5.0, rel=1e-6)      # 1.265: 12.6 × lr, not lr
    assert eta() == pytest.approx(authors(0.1, 1.0), rel=1e-6) == pytest.approx(authors(1e-3, 1.0), rel=1e-6)
    assert eta(dal_power=2.0) == pytest.approx(0.8, rel=1e-6)               # 2/v² = 2·10/25
    assert eta(dal_max_lr=1.0) == pytest.approx(1.0)                        # the absolute cap
    assert eta(dal_power=0.5, dal_max_lr=1.0) == pytest.approx(authors(0.1, 0.5, max_lr_scale=1.0), rel=1e-6)
    assert eta(dal_power=0.0) == pytest.approx(0.1)                         # p = 0: plain SGD at lr


@pytest.mark.parametrize("nesterov", [False, True])
def test_the_threshold_is_that_of_the_update_map_at_the_last_step_size(nesterov):
    """With η_t scaling g before the buffer, one update maps (x, v) to (x', v') by the
    constant-step map at η_t, whatever the earlier steps were (they are in v): on
    f = ½λx² its spectral radius crosses 1 where λ crosses the threshold of η_t."""
    config = OptimizerConfig(name="sgd", lr=1.0, momentum=0.8, nesterov=nesterov, step_size_rule="corridor")
    optimizer, lam = make_optimizer(config), 1.0
    treedef = jax.tree_util.tree_structure(optimizer.init(jnp.zeros(1)))
    assert treedef.num_leaves == 1                                  # the momentum buffer v only

    def one_update(state, eta):                                     # (x, v) -> (x', v')
        x, v = state[:1], state[1:]
        updates, new = optimizer.update(lam * x, jax.tree_util.tree_unflatten(treedef, [v]), x,
                                        step_size=eta)
        return jnp.concatenate([x + updates, jax.tree_util.tree_leaves(new)[0]])

    eta_edge = stability_threshold(config, 1.0) / lam               # λη = 2+2β, or (2+2β)/(1+2β): Nesterov
    for factor, stable in ((0.98, True), (1.02, False)):
        eta = jnp.float32(factor * eta_edge)
        jacobian = jax.jacobian(one_update)(jnp.asarray([0.3, -0.2]), eta)
        radius = np.max(np.abs(np.linalg.eigvals(np.asarray(jacobian, np.float64))))
        assert (radius < 1) == stable and (lam < stability_threshold(config, float(eta))) == stable, radius


@pytest.mark.parametrize("before, after", [(0.9, 1.1), (1.1, 0.9)], ids=["step-up", "step-down"])
def test_after_a_step_change_the_last_step_predicts_growth_and_a_momentum_average_lags(before, after):
    """1-D quadratic f = ½x², heavy ball β = 0.9 under a rule's η_t: 40 updates at `before`, then
    `after`, times the threshold step (2+2β)/λ. The last step's threshold is right from the
    first update after the change; the momentum-weighted average of recent steps
    η_eff = (1−β)Σ_k β^k η_{t−k} (an EMA) lags by 6 updates, so it is not the threshold's η."""
    beta, lam = 0.9, 1.0
    config = OptimizerConfig(name="sgd", lr=1.0, momentum=beta, step_size_rule="corridor")
    optimizer, edge = make_optimizer(config), (2 + 2 * beta) / lam
    x, state = jnp.ones(1), optimizer.init(jnp.ones(1))
    etas = [before * edge] * 40 + [after * edge] * 20
    xs, averages, average = [], [], etas[0]
    for eta in etas:
        average = beta * average + (1 - beta) * eta                 # η_eff, exactly its recursion
        updates, state = optimizer.update(lam * x, state, x, step_size=jnp.float32(eta))
        x = x + updates
        xs.append(abs(float(x[0])))
        averages.append(average)
    xs = np.asarray(xs)
    assert averages[40] == pytest.approx(edge * (0.1 * after + 0.9 * before))
    # Both rules read the same threshold function; they differ in the η they give it.
    says_average = [lam > stability_threshold(config, a) for a in averages[40:46]]   # "unstable"?
    says_last = [lam > stability_threshold(config, eta) for eta in etas[40:46]]
    if after > before:
        # The iterates grow from the first update at the larger step: in 6 updates to 37 × |x|
        # at the change, 6.5 × the largest |x| of the 32 updates before, while the average
        # still says stable.
        assert all(says_last) and not any(says_average)
        assert np.all(np.diff(xs[39:46]) > 0) and xs[45] > 5 * xs[39] and xs[45] > 5 * xs[7:40].max()
    else:
        # They grew 1.77 × per update before; at the smaller step they stop at once (never
        # 2 % above |x| at the change, 0.3 × it 12 updates on) while the average says unstable.
        assert not any(says_last) and all(says_average)
        assert xs[39] > 1.7 * xs[38] and xs[40:].max() < 1.02 * xs[39] and xs[51] < 0.35 * xs[39]


def test_a_rule_scales_the_gradient_before_the_heavy_ball_trace():
    config = OptimizerConfig(name="sgd", lr=1.0, momentum=0.8, step_size_rule="corridor")
    optimizer = make_optimizer(config)
    x, state, v = jnp.asarray(X), optimizer.init(jnp.asarray(X)), np.zeros(2, np.float32)
    expected = X.copy()
    for eta in (0.1, 0.03, 0.2):
        g = A @ np.asarray(x)
        updates, state = optimizer.update(jnp.asarray(g), state, x, step_size=jnp.float32(eta))
        x = optax.apply_updates(x, updates)
        v = 0.8 * v + eta * (A @ expected)              # v ← βv + η_t g, θ ← θ − v
        expected = expected - v
        np.testing.assert_allclose(x, expected, rtol=1e-5)


def test_gradient_penalty_gradient_matches_finite_differences():
    with enable_x64():
        rng = np.random.default_rng(0)
        inputs, targets = rng.normal(size=(16, 3)), rng.normal(size=16)
        params = {"w": jnp.asarray(rng.normal(size=(3, 5))), "v": jnp.asarray(rng.normal(size=5))}

        def loss(p):
            return jnp.mean(jnp.square(jnp.tanh(inputs @ p["w"]) @ p["v"] - targets))

        penalty = lambda p: regularisers.gradient_norm_penalty(loss, p)
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        analytic = jax.flatten_util.ravel_pytree(jax.grad(penalty)(params))[0]
        h = 1e-6
        numeric = np.array([(penalty(unravel(flat.at[i].add(h))) - penalty(unravel(flat.at[i].add(-h)))) / (2 * h)
                            for i in range(flat.shape[0])])
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)
        grad = jax.flatten_util.ravel_pytree(jax.grad(loss)(params))[0]
        assert float(penalty(params)) == pytest.approx(float(grad @ grad))


def _small_learner(**agent_fields) -> Learner:
    agent = AgentConfig(hidden_sizes=[8, 8], target_update_period=50, **agent_fields)
    return Learner(networks.make_network(agent, "gym", (4,), 3), agent, seed=0)


def _batch(seed: int) -> Transition:
    rng = np.random.default_rng(seed)
    return Transition(obs=rng.normal(size=(32, 4)).astype(np.float32),
                      action=rng.integers(0, 3, 32).astype(np.int32),
                      reward=rng.normal(size=32).astype(np.float32),
                      discount=np.full(32, 0.99, np.float32),
                      next_obs=rng.normal(size=(32, 4)).astype(np.float32))


def test_the_learner_objective_adds_each_penalty_to_the_td_loss():
    learner = _small_learner(gradient_penalty=0.3, geometric_complexity_penalty=0.05, geometric_complexity_rows=20)
    s, batch = learner.state, _batch(0)
    total, (_, _, terms) = learner.objective_fn(s.params, s.target_params, s.net_state, s.target_net_state,
                                                batch, False)
    td = lambda p: learner.loss_fn(p, s.target_params, s.net_state, s.target_net_state, batch, False)[0]
    grad = jax.flatten_util.ravel_pytree(jax.grad(td)(s.params))[0]
    complexity = regularisers.q_network_complexity(learner.network, s.params, s.net_state, batch.obs[:20])
    assert float(terms["loss"]) == pytest.approx(float(td(s.params)))
    assert float(terms["gradient_norm_sq"]) == pytest.approx(float(grad @ grad), rel=1e-5)
    assert float(terms["geometric_complexity"]) == pytest.approx(float(complexity), rel=1e-5)
    assert float(total) == pytest.approx(float(td(s.params) + 0.3 * grad @ grad + 0.05 * complexity), rel=1e-5)


@pytest.mark.parametrize("rule", ["drift_adjusted", "corridor"])
def test_the_probe_threshold_follows_the_last_step_size(rule):
    # A cap far above the rule's step, so η_t is the rule's (DAL's is dal_max_lr, not lr).
    optimizer = OptimizerConfig(name="sgd", lr=50.0, momentum=0.8, step_size_rule=rule, dal_power=1.0,
                                dal_max_lr=50.0, corridor_scale=0.2)
    learner = _small_learner(optimizer=optimizer)
    prober = Prober(ProbeConfig(enabled=True, every=1, num_eigs=1, iterations=20, batch_size=32),
                    learner.agent, learner.loss_fn, learner.network)
    steps = []
    for i in range(4):
        metrics = learner.update(_batch(i))
        eta = float(metrics["lr"])
        assert 0 < eta < 50.0 and learner.current_lr() == eta
        record = prober.probe(prober.snapshot(learner.state, learner.current_lr(), 0), _batch(10))
        assert record["lr"] == eta and record["threshold"] == pytest.approx((2 + 2 * 0.8) / eta)
        steps.append(eta)
    assert len(set(steps)) > 1, steps  # η_t changes from update to update


@pytest.mark.parametrize("sets, says", [
    (["agent.optimizer.step_size_rule=corridor"], "agent.optimizer.step_size_rule: corridor is a rule for sgd"),
    (["agent.optimizer.name=sgd", "agent.optimizer.step_size_rule=drift_adjusted",
      "agent.optimizer.lr_schedule=linear", "agent.optimizer.lr_decay_updates=10"], "agent.optimizer.lr_schedule"),
    (["agent.gradient_penalty=-1"], "agent.gradient_penalty: must be >= 0"),
    (["agent.optimizer.step_size_rule=polyak"], "agent.optimizer.step_size_rule: unknown value 'polyak'"),
    (["agent.optimizer.dal_max_lr=0"], "agent.optimizer.dal_max_lr: must be > 0"),
    (["agent.optimizer.dal_max_lr=-1"], "agent.optimizer.dal_max_lr: must be > 0"),
])
def test_bad_step_size_settings_are_refused(sets, says):
    with pytest.raises(ConfigError, match=says.replace("(", r"\(")):
        load_config(CONFIGS / "dqn_cartpole.yaml", sets)


@pytest.mark.slow
@pytest.mark.parametrize("kind, sets, term", [
    ("dqn", ["agent.optimizer.step_size_rule=drift_adjusted", "agent.optimizer.dal_max_lr=1.0",
             "agent.gradient_penalty=0.1"], "gradient_norm_sq"),
    ("c51", ["agent.optimizer.step_size_rule=corridor", "agent.optimizer.corridor_scale=0.01",
             "agent.geometric_complexity_penalty=0.01"], "geometric_complexity"),
])
def test_minatar_runs_log_the_step_size_and_probe_against_its_threshold(tmp_path, kind, sets, term):
    from eosrl.launch.rundir import read_metrics
    from eosrl.launch.train import train
    config = load_config(CONFIGS / "eos_dqn_minatar_breakout.yaml", [
        f"agent.kind={kind}", "agent.optimizer.lr=1.0", "replay.min_size=500", "replay.batch_size=64",
        "run.total_env_steps=1700", "run.log_every=400", "run.eval_every=0", "run.eval_episodes=1",
        "probe.every=100", "probe.batch_size=128", "probe.num_eigs=2", "probe.iterations=10", *sets])
    summary = train(config, tmp_path / "run", progress=False)
    assert summary["status"] == "completed" and summary["learner_updates"] == 300
    trains = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "train") if "loss" in r]
    probes = list(read_metrics(tmp_path / "run" / "metrics.jsonl", "probe"))
    assert len(trains) == 3 and [p["step"] for p in probes] == [100, 200, 300]  # a record per 100 updates
    for r in trains:
        assert r["lr_min"] <= r["lr"] <= r["lr_max"] <= 1.0 and np.isfinite(r[term])
    assert len({r["lr"] for r in trains}) > 1 and any(r["lr_min"] < r["lr_max"] for r in trains)
    for p in probes:  # the η_t of the update that made the probed parameters
        assert p["threshold"] == pytest.approx((2 + 2 * 0.8) / p["lr"])
        assert min(r["lr_min"] for r in trains) <= p["lr"] <= max(r["lr_max"] for r in trains)
