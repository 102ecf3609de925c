"""Per-update loss traces (`probe.loss_trace_window`, launch/loss_traces.py): the windows
around target copies and after near-threshold probes, and the traced losses, which equal
the `loss` metric of single updates bit for bit on both paths of the learner loop (fused
on the device and one update at a time). Also: the fused path ends a run one update before
each probe, so the probe has that update's Δθ (`update_projection_v1`)."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from conftest import CONFIGS, random_items
from eosrl.agents import offline
from eosrl.launch.builder import Builder
from eosrl.launch.config import ConfigError, load_config
from eosrl.launch.loss_traces import LossTraces, read_losses
from eosrl.launch.rundir import read_metrics
from test_offline_device import _record, _small_offline


def test_windows_around_target_copies_and_after_near_probes():
    traces = LossTraces(window=4, target_period=4)
    assert not traces.wanted(1, 2) and traces.wanted(1, 3) and traces.wanted(7, 7) and traces.wanted(11, 11)
    records = []
    for update in range(1, 14):
        if update == 5:
            traces.near_threshold(5, 0.5)   # below 0.9 of the threshold: nothing
            traces.near_threshold(5, 0.95)  # opens updates 6 … 9
        records += traces.add(update, float(update))
    records += traces.flush()  # the run ends inside the window of the copy at 12
    got = [(r["reason"], r["step"], r["losses"]) for r in records]
    assert got == [("target_copy", 3, [3.0, 4.0, 5.0, 6.0]), ("near_threshold", 6, [6.0, 7.0, 8.0, 9.0]),
                   ("target_copy", 7, [7.0, 8.0, 9.0, 10.0]), ("target_copy", 11, [11.0, 12.0, 13.0])]
    assert [r.get("target_copy") for r in records] == [4, None, 8, 12]
    assert records[1]["probe_step"] == 5 and records[1]["sharpness_over_threshold"] == 0.95
    # An odd window: ⌊W/2⌋ updates up to the copy, ⌈W/2⌉ after it.
    odd = LossTraces(window=3, target_period=10)
    assert [odd.wanted(u, u) for u in (9, 10, 11, 12, 13)] == [False, True, True, True, False]
    assert not LossTraces(window=0, target_period=4).wanted(1, 100)
    # Near windows last until the next probe (probe.every, here 5): while the probes read
    # λ₁ near the threshold the trace is continuous.
    near = LossTraces(window=2, target_period=1000, near_length=5)
    records = []
    for update in range(1, 18):
        if update in (5, 10):
            near.near_threshold(update, 0.92)
            assert near.wanted(update + 1, update + 1)
        records += near.add(update, float(update))
    assert [(r["step"], r["window"], r["losses"]) for r in records] == [
        (6, 5, [6.0, 7.0, 8.0, 9.0, 10.0]), (11, 5, [11.0, 12.0, 13.0, 14.0, 15.0])]
    assert not near.wanted(18, 900)


def test_loss_trace_window_is_validated():
    assert load_config(CONFIGS / "dqn_cartpole.yaml").probe.loss_trace_window == 0  # off by default
    with pytest.raises(ConfigError, match=r"probe.loss_trace_window: must be >= 0, got -2"):
        load_config(CONFIGS / "dqn_cartpole.yaml", ["probe.loss_trace_window=-2"])


def _single_losses(builder, data, count):
    """The losses of `count` single jitted updates on the draws a fused run makes."""
    single = builder.make_learner()
    losses = []
    for _ in range(count):
        rng, key = jax.random.split(single.state.rng)
        single.state = single.state._replace(rng=rng)
        losses.append(single.update(offline.sample_items(data, key, builder.config.replay.batch_size))["loss"])
    return losses


@pytest.mark.parametrize("scan", [False, True])
def test_fused_run_returns_the_single_updates_losses(tmp_path, scan):
    config = _small_offline(tmp_path, ["run.total_updates=9"])
    builder = Builder(config)
    data, _ = offline.load(builder)
    fused = builder.make_learner()
    fused.scan = scan
    first, second = fused.run(data, 5, losses=True), fused.run(data, 4)
    assert second.losses is None
    want = _single_losses(builder, data, 9)
    assert first.losses.tolist() == want[:5]  # bit for bit (CPU), as the fused states are
    assert first["loss"] == want[4]


@pytest.mark.slow  # an offline `eosrl train` run (11 s on 2 cores, 35 s when they are busy)
def test_offline_run_writes_the_loss_trace_of_single_updates(tmp_path):
    from eosrl.launch.train import train
    config = _small_offline(tmp_path, ["run.total_updates=12", "probe.loss_trace_window=4", "probe.enabled=true",
                                       "probe.every=5", "probe.num_eigs=1", "probe.batch_size=32",
                                       "probe.iterations=10"])
    train(config, tmp_path / "run", progress=False)
    records = list(read_metrics(tmp_path / "run" / "metrics.jsonl"))
    traces = [r for r in records if r["kind"] == "loss_trace" and r["reason"] == "target_copy"]
    # (a probe near the threshold also opens a window: these lr and net are at the edge)
    assert all(r["probe_step"] in (5, 10) for r in records if r.get("reason") == "near_threshold")
    # Target copies every 4 updates: 3 … 6, 7 … 10, then 11, 12 (the run ends inside it).
    assert [(r["step"], r["reason"], r["target_copy"], len(r["losses"])) for r in traces] == [
        (3, "target_copy", 4, 4), (7, "target_copy", 8, 4), (11, "target_copy", 12, 2)]
    builder = Builder(config)
    data, _ = offline.load(builder)
    want = _single_losses(builder, data, 12)
    assert read_losses(records) == {u: want[u - 1] for u in range(3, 13)}
    # The update before each probe ran alone: both probes have its Δθ on v₁.
    probes = [r for r in records if r["kind"] == "probe"]
    assert [r["step"] for r in probes] == [5, 10]
    for r in probes:
        assert math.isfinite(r["update_projection_v1"]) and -1 <= r["update_projection_v1_cosine"] <= 1
    assert "v1_overlap" not in probes[0] and 0 <= probes[1]["v1_overlap"] <= 1 + 1e-6
    _readers_take_it(tmp_path / "run", tmp_path)


def _readers_take_it(run_dir, tmp_path):
    """Plots and the study aggregation read a run with `loss_trace` records."""
    from eosrl.launch import plot
    from eosrl.launch.study import aggregate
    assert plot.plot_runs([run_dir], tmp_path / "plots")
    records = plot.read_metrics(run_dir / "metrics.jsonl")
    assert aggregate.ratio_series(records, "sharpness") is not None


def test_learner_loop_traces_each_update_and_keeps_the_update_before_a_probe(tmp_path):
    """One update at a time (`LearnerLoop.step`): the trace's losses are the updates' own
    (`train` records every update, `run.log_every=1`), and probes carry Δθ."""
    from eosrl.launch.learning import LearnerLoop
    from eosrl.launch.rundir import MetricsWriter, RunDir
    config = load_config(CONFIGS / "dqn_cartpole.yaml", [
        "probe.enabled=true", "probe.every=3", "probe.batch_size=32", "probe.num_eigs=1", "probe.iterations=10",
        "probe.loss_trace_window=4", "agent.target_update_period=4", "run.log_every=1", "replay.batch_size=16",
        "agent.hidden_sizes=[16, 16]", "agent.optimizer.name=sgd", "agent.optimizer.momentum=0.9"])
    builder = Builder(config)
    rng = np.random.default_rng(0)
    rdir = RunDir(tmp_path).create()
    metrics = MetricsWriter(rdir, tensorboard=False)
    loop = LearnerLoop(builder, rdir, metrics, iter(lambda: random_items(builder, 16, rng), None),
                       sample_items=lambda n: random_items(builder, n, rng), env_steps=lambda: 7)
    for _ in range(7):
        assert loop.step() is None
    loop.finish("completed")
    metrics.close()
    records = list(read_metrics(rdir.metrics))
    losses = {r["step"]: r["loss"] for r in records if r["kind"] == "train" and "loss" in r}
    traces = [r for r in records if r["kind"] == "loss_trace" and r["reason"] == "target_copy"]
    assert [(r["step"], len(r["losses"])) for r in traces] == [(3, 4), (7, 1)]
    assert read_losses(records) == {u: losses[u] for u in range(3, 8)}
    probes = [r for r in records if r["kind"] == "probe"]
    assert [r["step"] for r in probes] == [3, 6]
    assert all("update_projection_v1" in r for r in probes) and "v1_overlap" in probes[1]
