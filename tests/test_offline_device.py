"""The offline regime on the device (agents/offline.py) and fused updates: the device
items are the Reverb items, bit for bit, on MinAtar- and Atari-shaped datasets (episode
ends, truncation, n-step windows cut by an end, subsets, corrupted actions); a K-update
scan equals K single updates; divergence inside a scan is reported at its update; two
offline runs with one seed are bit-identical; the λ₁-only probe agrees with the top-k."""
import json

import jax
import numpy as np
import pytest
import reverb

from conftest import CONFIGS
from eosrl.agents import offline, replay
from eosrl.launch.builder import Builder
from eosrl.launch.config import load_config
from eosrl.agents.dataset import DatasetError, DatasetWriter
from eosrl.launch.rundir import read_metrics
from eosrl.launch.train import train

ENDS = ("terminal", "truncated", "terminal", "open")  # the last episode is cut by the recording


def _record(path, config, lengths, seed=0):
    """Episodes of random frames in the env's shapes: lengths[i] steps, ended as ENDS
    cycles (short ones make n-step windows that an episode end cuts)."""
    builder = Builder(config)
    spec, rng = builder.spec, np.random.default_rng(seed)

    def obs():
        if spec.obs_dtype == np.bool_:
            return rng.random(spec.obs_shape) < 0.2
        return rng.integers(0, 256, spec.obs_shape, dtype=np.uint8)

    writer = DatasetWriter.for_env(path, config.env, shard_size=97)
    for i, length in enumerate(lengths):
        end = ENDS[i % len(ENDS)] if i < len(lengths) - 1 else "open"
        writer.add_first(obs())
        for t in range(length):
            last = t == length - 1
            writer.add(int(rng.integers(spec.num_actions)), float(rng.normal()), last and end == "terminal",
                       last and end == "truncated", obs())
    writer.close()


def _reverb_items(builder):
    """Every item the Reverb path makes of the regime's dataset, in insertion order (a
    queue table in place of the uniform one)."""
    size = builder.preloaded_transitions()
    server = replay.start_server([reverb.Table.queue(replay.REPLAY_TABLE, size, signature=builder.signature())])
    try:
        client = reverb.Client(f"localhost:{server.port}")
        adder = builder.make_adder(client)
        loaded = builder.load_dataset(adder)
        adder.flush()
        items = replay.sample_items(client, size, builder.signature())
        adder.close()
    finally:
        server.stop()
    return items, loaded


@pytest.mark.parametrize("env_config, n_step, overrides", [
    ("eos_dqn_minatar_breakout.yaml", 3, ["regime.subset=all"]),
    ("eos_dqn_minatar_breakout.yaml", 3, ["regime.subset=random 150", "regime.corruption=0.3"]),
    pytest.param("dqn_atari_pong.yaml", 3, ["regime.subset=last 120", "regime.corruption=0.25"],
                 marks=pytest.mark.slow),
    pytest.param("dqn_atari_pong.yaml", 1, ["regime.subset=first 100"], marks=pytest.mark.slow),
])
def test_device_items_are_the_reverb_items(tmp_path, env_config, n_step, overrides):
    base = load_config(CONFIGS / env_config)
    _record(tmp_path / "data", base, [1, 2, 40, 3, 5, 60, 2, 30, 25])
    config = load_config(CONFIGS / env_config, ["regime.mode=offline", f"regime.dataset={tmp_path / 'data'}",
                                                f"agent.n_step={n_step}", "run.seed=3", "run.total_updates=10"] + overrides)
    builder = Builder(config)
    items, loaded = _reverb_items(builder)
    data, device_loaded = offline.load(builder)
    assert {k: v for k, v in device_loaded.items() if k != "device_bytes"} == loaded
    assert data.size == len(items["rows"]) == builder.preloaded_transitions()
    window = data.layout.window
    rows = np.asarray(data.rows)[np.asarray(data.starts)[:, None] + np.arange(window)]
    np.testing.assert_array_equal(rows, items["rows"])  # every byte of every item, in order
    # A sampled batch is the decoded Reverb item of each drawn transition.
    key = jax.random.PRNGKey(7)
    index = np.asarray(jax.random.randint(key, (64,), 0, data.size))
    got = jax.jit(offline.sample, static_argnums=2)(data, key, 64)
    want = builder.layout.to_transition({"rows": items["rows"][index]})
    for field, a, b in zip(got._fields, got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=field)
    # The memory estimate bounds what was loaded (module docstring's formula).
    from eosrl.agents.dataset import DatasetReader
    reader = DatasetReader(config.regime.dataset)
    assert data.nbytes <= offline.estimate_bytes(builder, reader, builder.selection(reader))


def test_a_dataset_that_does_not_fit_is_refused_with_its_figure(tmp_path, monkeypatch):
    base = load_config(CONFIGS / "eos_dqn_minatar_breakout.yaml")
    _record(tmp_path / "data", base, [50, 50])
    config = load_config(CONFIGS / "eos_dqn_minatar_breakout.yaml",
                         ["regime.mode=offline", f"regime.dataset={tmp_path / 'data'}", "run.total_updates=10"])
    monkeypatch.setattr(offline, "available_bytes", lambda: (1000, "test memory"))
    with pytest.raises(DatasetError, match=r"0.04 MB as uint8 rows .*more than the 0.00 MB.*regime\.subset"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything started


# --- fused updates ---------------------------------------------------------------------


def _small_offline(tmp_path, extra=()):
    base = load_config(CONFIGS / "dqn_cartpole.yaml")
    if not (tmp_path / "data").exists():
        _record(tmp_path / "data", base, [30, 20, 45, 25, 40])
    return load_config(CONFIGS / "dqn_cartpole.yaml", [
        "regime.mode=offline", f"regime.dataset={tmp_path / 'data'}", "replay.batch_size=32",
        "agent.target_update_period=4", "run.eval_every=0", "run.eval_episodes=1", "run.log_every=10",
        "run.checkpoint_every=20", "replay.checkpoint=false"] + list(extra))


@pytest.mark.parametrize("config_name, scan, tolerance", [
    ("dqn_cartpole.yaml", False, 0.0),  # the CPU's path: K dispatches of the jitted step
    ("dqn_cartpole.yaml", True, 0.0),   # one lax.scan (accelerators)
    pytest.param("eos_dqn_minatar_breakout.yaml", False, 0.0, marks=pytest.mark.slow),
    # XLA compiles a scan's body apart from the top-level program; for the MinAtar CNN it
    # lays out / fuses the convolutions differently there, which moves float32 rounding by
    # about an ulp per update (max |Δ| 6e-8 after 6 updates, measured). The same updates
    # unrolled in one program match the single updates exactly, so it is not the maths.
    pytest.param("eos_dqn_minatar_breakout.yaml", True, 1e-6, marks=pytest.mark.slow),
])
def test_a_fused_run_equals_single_updates(tmp_path, config_name, scan, tolerance):
    """K fused updates (target copies inside) = K jitted updates on the same draws."""
    _record(tmp_path / "data", load_config(CONFIGS / config_name), [30, 20, 45, 25, 40])
    config = load_config(CONFIGS / config_name, [
        "regime.mode=offline", f"regime.dataset={tmp_path / 'data'}", "replay.batch_size=32",
        "agent.target_update_period=4", "run.total_updates=9"])
    builder = Builder(config)
    data, _ = offline.load(builder)
    fused, single = builder.make_learner(), builder.make_learner()
    fused.scan = scan
    window = fused.run(data, 9)
    metrics = []
    for _ in range(9):  # the same keys, drawn as the fused update draws them
        rng, key = jax.random.split(single.state.rng)
        single.state = single.state._replace(rng=rng)
        metrics.append(single.update(offline.sample_items(data, key, builder.config.replay.batch_size)))
    assert fused.step == single.step == 9 and window.count == 9
    for a, b in zip(jax.tree_util.tree_leaves(fused.state), jax.tree_util.tree_leaves(single.state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=tolerance)
    count, sums, mins, maxs = window.summary()
    for i, name in enumerate(window):
        values = np.array([m[name] for m in metrics], np.float32)
        np.testing.assert_allclose([window[name], mins[i], maxs[i]], [values[-1], values.min(), values.max()],
                                   rtol=tolerance * 10, atol=0)
        np.testing.assert_allclose(sums[i], values.sum(), rtol=1e-6)


@pytest.mark.slow  # offline `eosrl train` runs
def test_divergence_inside_a_scan_is_reported_at_its_update(tmp_path):
    config = _small_offline(tmp_path, ["run.total_updates=300", "agent.optimizer.lr=1e6",
                                       "agent.optimizer.name=sgd", "agent.optimizer.momentum=0.0",
                                       "run.log_every=100", "run.checkpoint_every=100"])
    summary = train(config, tmp_path / "nan", progress=False)
    assert summary["status"] == "diverged"
    records = list(read_metrics(tmp_path / "nan" / "metrics.jsonl"))
    [event] = [r for r in records if r["kind"] == "event" and r["event"] == "divergence"]
    # The same run one update at a time: the first non-finite loss is at that update.
    builder = Builder(config)
    data, _ = offline.load(builder)
    learner = builder.make_learner()
    first_bad = None
    while first_bad is None and learner.step < 300:
        if not np.isfinite(learner.run(data, 1)["loss"]):
            first_bad = learner.step
    assert first_bad is not None and event["step"] == first_bad
    finished = [r for r in records if r["kind"] == "event" and r["event"] == "learner_finished"][0]
    assert finished["diverged_at"] == first_bad and summary["learner_updates"] == first_bad


@pytest.mark.slow  # offline `eosrl train` runs
def test_two_offline_runs_with_one_seed_are_bit_identical(tmp_path):
    config = _small_offline(tmp_path, ["run.total_updates=60", "probe.enabled=true", "probe.every=20",
                                       "probe.num_eigs=2", "probe.batch_size=32", "probe.full_every=40",
                                       "probe.batch_sharpness_batches=1", "run.eval_every=30",
                                       "probe.dataset_every=40", "probe.dataset_transitions=50"])
    runs = []
    for name in ("a", "b"):
        train(config, tmp_path / name, progress=False)
        records = [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["kind"] in ("train", "probe", "eval")]
        for r in records:
            for key in ("updates_per_second", "seconds", "wall_seconds", "time", "env_steps_per_second"):
                r.pop(key, None)
        with np.load(sorted((tmp_path / name / "checkpoints").glob("ckpt_*.npz"))[-1]) as arrays:
            state = {key: arrays[key] for key in arrays.files}
        runs.append((json.dumps(records, sort_keys=True), state))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1].keys() == runs[1][1].keys()
    for key in runs[0][1]:  # learner state (the sampler's key included) and the probe batch
        np.testing.assert_array_equal(runs[0][1][key], runs[1][1][key], err_msg=key)
    probes = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl", "probe")]
    assert [len(r["eigenvalues"]) for r in probes] == [1, 2, 1]  # λ₁ only between full probes
    # λ₁ of the loss over 50 of the dataset's transitions (probe.dataset_every), at update 40 only.
    assert [r.get("dataset_transitions") for r in probes] == [None, 50, None]
    assert probes[1]["dataset_sharpness"] > 0 and "loss" in probes[0]


@pytest.mark.slow  # offline `eosrl train` runs
def test_resume_continues_the_sampler_stream(tmp_path):
    """A run stopped at a checkpoint and resumed makes the records of one that never stopped."""
    config = _small_offline(tmp_path, ["run.total_updates=40"])
    train(config, tmp_path / "whole", progress=False)
    train(_small_offline(tmp_path, ["run.total_updates=20"]), tmp_path / "split", progress=False)
    train(config, tmp_path / "split", resume=True, progress=False)

    def losses(name):
        return {r["step"]: r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl", "train")}
    assert losses("whole") == losses("split")


# --- λ₁-only probes -------------------------------------------------------------------


def test_lambda1_probe_equals_the_top_k_lambda1_within_tolerance():
    from eosrl.agents import networks, probes
    from eosrl.agents.config import AgentConfig, OptimizerConfig, ProbeConfig
    from eosrl.agents.learner import Learner
    from eosrl.agents.types import Transition
    rng = np.random.default_rng(0)
    batch = Transition(obs=rng.normal(size=(64, 4)).astype(np.float32), action=rng.integers(0, 3, 64).astype(np.int32),
                       reward=rng.normal(size=64).astype(np.float32),
                       discount=np.full(64, 0.99, np.float32), next_obs=rng.normal(size=(64, 4)).astype(np.float32))
    agent = AgentConfig(kind="dqn", hidden_sizes=[8, 8], optimizer=OptimizerConfig(name="sgd", lr=0.01),
                        target_update_period=7)
    learner = Learner(networks.make_network(agent, "gym", (4,), 3), agent, seed=0)
    for _ in range(20):
        learner.update(batch)
    tolerance = 1e-4
    prober = probes.Prober(ProbeConfig(enabled=True, every=10, full_every=20, num_eigs=5, iterations=60,
                                       tolerance=tolerance), learner.agent, learner.loss_fn, learner.network)
    assert not prober.is_full(10) and prober.is_full(20)
    snap = prober.snapshot(learner.state, learner.current_lr(), 0)
    cold = prober.probe(snap, batch, full=False)  # the first probe: random start vectors
    full = prober.probe(snap, batch)
    warm = prober.probe(snap, batch, full=False)  # from the full probe's top eigenvector
    assert (cold["full"], cold["num_eigs"], full["full"], full["num_eigs"]) == (False, 1, True, 5)
    assert len(cold["eigenvalues"]) == 1 and "lambda_min" not in cold
    lam = full["eigenvalues"][0]
    for record in (cold, warm):  # each within its residual, ≤ tolerance·|λ₁|, of the true λ₁
        assert record["converged"] == [True]
        assert abs(record["sharpness"] - lam) <= 2 * tolerance * abs(lam)
    assert warm["hvps"] < cold["hvps"] and warm["hvps"] < full["hvps"]


def test_full_every_must_be_a_multiple_of_every():
    from eosrl.agents.config import ConfigError
    with pytest.raises(ConfigError, match=r"probe.full_every: 150 is not a multiple of probe.every 100"):
        load_config(CONFIGS / "dqn_cartpole.yaml", ["probe.every=100", "probe.full_every=150"])
    assert load_config(CONFIGS / "dqn_cartpole.yaml", ["probe.every=100", "probe.full_every=1000"]).probe.full_every == 1000
