"""The prober role (`probe.mode: process`): probes measured in their own process at
the learner steps they belong to, equal to what the learner would measure inline,
the queue policy (skipped snapshots are events, never silent), a killed prober
restarted without losing the snapshot it was measuring, and the fixed probe batch
kept across a restart and a resume."""
import os
import signal
import subprocess

import jax
import numpy as np
import pytest

from conftest import CONFIGS, ROOT, random_items
from processes import eosrl, events, kill_launch, pids, wait_for
from eosrl.agents import checkpoint
from eosrl.launch.builder import Builder
from eosrl.launch.config import load_config
from eosrl.agents.probes import Prober
from eosrl.launch.learning import LearnerLoop
from eosrl.launch.prober import PROBE_BATCH_FILE, batch_digest, load_probe_batch
from eosrl.launch.rundir import MetricsWriter, RunDir, read_metrics

PROBE = ["probe.enabled=true", "probe.mode=process", "probe.batch_size=128", "probe.num_eigs=3",
         "probe.tolerance=1e-4"]


class RefusingQueue:
    """A prober queue that is always full."""
    max_queued = 2

    def offer(self, snapshot):
        return False


def test_a_full_queue_skips_the_snapshot_with_an_event(tmp_path):
    config = load_config(CONFIGS / "dqn_cartpole.yaml", PROBE + ["probe.every=2", "replay.batch_size=8"])
    builder = Builder(config)
    rdir = RunDir(tmp_path).create()
    metrics = MetricsWriter(rdir, tensorboard=False)
    batches = iter(lambda: builder.batch_template(8), None)
    loop = LearnerLoop(builder, rdir, metrics, batches, sample_items=builder.batch_template, env_steps=lambda: 7,
                       probe_queue=RefusingQueue())
    for _ in range(5):
        assert loop.step() is None
    metrics.close()
    skipped = [r for r in read_metrics(rdir.metrics, "event") if r["event"] == "probe_skipped"]
    assert [r["step"] for r in skipped] == [2, 4]
    assert all(r["env_steps"] == 7 and "2 snapshots wait" in r["reason"] for r in skipped)
    assert not list(read_metrics(rdir.metrics, "probe"))
    assert loop.probe_batch is None  # the prober process keeps the batch, not the learner


# ----------------------------------------------------------------------------
# Launched offline runs: replay server + learner + prober + evaluator.


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from eosrl.launch.train import train
    root = tmp_path_factory.mktemp("collect")
    train(load_config(CONFIGS / "dqn_cartpole.yaml", [
        "run.total_env_steps=1000", "replay.min_size=500", "run.eval_every=0", "run.eval_episodes=1",
        "replay.checkpoint=false", f"replay.record_to={root / 'dataset'}"]), root, progress=False)
    return root / "dataset"


def _offline(dataset, run_dir, *sets):
    args = ["launch", str(CONFIGS / "dqn_cartpole.yaml"), "--run-dir", str(run_dir), "--no-progress"]
    for item in [*PROBE, "regime.mode=offline", f"regime.dataset={dataset}", "run.eval_every=0",
                 "run.eval_episodes=1", "run.log_every=100", "replay.min_size=500", *sets]:
        args += ["--set", item]
    return eosrl(*args)


def _probes(run_dir):
    path = RunDir(run_dir).metrics
    return list(read_metrics(path, "probe")) if path.exists() else []


def _inline_probes_of_the_same_snapshots(run_dir, records):
    """Each record's snapshot (the learner's checkpoint at its step) probed inline in this
    process on the prober's batch, in the same order, so the warm starts chain the same
    way (restarting where the prober restarted cold)."""
    config = load_config(run_dir / "config.yaml")
    builder = Builder(config)
    learner = builder.make_learner()
    prober = Prober(config.probe, learner.agent, learner.loss_fn, learner.network, seed=config.run.seed)
    batch = learner.preprocess(load_probe_batch(run_dir))
    at_step = {checkpoint.read_meta(p)["learner_step"]: p for p in checkpoint.list_checkpoints(run_dir / "checkpoints")}
    for record in records:
        builder.restore(learner, at_step[record["step"]])
        if not record["warm_start"]:
            prober.forget_vectors()
        yield prober.probe(prober.snapshot(learner.state, learner.current_lr(), 0), batch)


@pytest.mark.slow
def test_prober_process_in_an_offline_launch(dataset, tmp_path):
    """Records at the learner's steps, equal to inline probes of the same snapshots; a
    prober killed while it measures restarted, the snapshot and batch it had measured
    with; nothing dropped silently; the same batch after --resume."""
    run_dir, every, total = tmp_path / "run", 500, 8000
    launcher = subprocess.Popen(_offline(dataset, run_dir, f"run.total_updates={total}", f"probe.every={every}",
                                         "probe.max_queued=4", f"run.checkpoint_every={every}",
                                         "run.keep_checkpoints=100", "probe.batch_sharpness_batches=1"),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Killed during its first probe: the batch is drawn and kept, the probe compiles for
        # seconds. (Killed after a record, it might have emptied the queue, end marker and
        # all, before the kill landed: then no snapshot would be left for its successor.)
        wait_for(lambda: (run_dir / PROBE_BATCH_FILE).exists(), 180, "the prober's batch")
        kept = batch_digest(load_probe_batch(run_dir))
        os.kill(pids(run_dir)["prober"], signal.SIGKILL)
        wait_for(lambda: events(run_dir, "prober_restarted"), 60, "the prober restart event")
        out, err = launcher.communicate(timeout=400)
    finally:
        kill_launch(launcher, run_dir)
    assert launcher.returncode == 0, err[-2000:]
    records = _probes(run_dir)
    restart = events(run_dir, "prober_restarted")[0]
    assert restart["exit_code"] == -signal.SIGKILL
    before = [r for r in records if r["time"] < restart["time"]]
    assert len(before) < len(records)  # probing went on after the restart
    assert events(run_dir, "prober_finished")[-1]["status"] == "completed"
    # Nothing dropped: every due step was probed or skipped (queue full) with an event; the
    # snapshot being measured when the prober was killed stayed queued for the next one.
    skipped = [e["step"] for e in events(run_dir, "probe_skipped")]
    probed = [r["step"] for r in records]
    assert sorted(probed + skipped) == list(range(every, total + 1, every))  # and exactly once each
    assert probed == sorted(probed)  # oldest first
    assert sum(not r["warm_start"] for r in records) == 1 + bool(before)  # the first probe of each prober

    raw = load_probe_batch(run_dir)
    assert {r["batch_digest"] for r in records} == {batch_digest(raw)} == {kept}  # the killed prober's batch
    for record, inline in zip(records, _inline_probes_of_the_same_snapshots(run_dir, records)):
        np.testing.assert_allclose(record["eigenvalues"], inline["eigenvalues"], rtol=1e-5)
        np.testing.assert_allclose(record["residuals"], inline["residuals"], rtol=1e-3, atol=1e-6)
        assert record["converged"] == inline["converged"]
        # The batch sharpness, on a fresh replay batch of the training size (not repeatable inline).
        assert record["batch_sharpness_batch_size"] == 64 and np.isfinite(record["batch_sharpness"])
        assert record["hvps"] - record["batch_hvps"] == inline["hvps"]
        assert record["grad_norm"] == pytest.approx(inline["grad_norm"], rel=1e-5)

    result = subprocess.run(eosrl("launch", "--resume", str(run_dir), "--no-progress",
                                  "--set", f"run.total_updates={total + every}"),
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    after = [r for r in _probes(run_dir) if r["step"] > total]
    assert after and {r["batch_digest"] for r in after} == {batch_digest(raw)}


def test_a_restarted_prober_records_each_snapshot_once(tmp_path):
    """A prober killed after writing a record but before deleting its snapshot: the next
    one finds the snapshot's key among the records and deletes it unprobed. The learner's
    end marker goes into a full queue at once, behind the snapshots, and stays there: a
    prober restarted after another read it (killed before it exited) ends too."""
    import reverb
    from eosrl.agents import replay
    from eosrl.launch.channels import SnapshotQueue
    from eosrl.launch.prober import run_prober, save_probe_batch
    config = load_config(CONFIGS / "dqn_cartpole.yaml", PROBE + ["probe.every=10", "probe.max_queued=4"])
    builder = Builder(config)
    server = replay.start_server([replay.probe_table(config.probe.max_queued)])
    try:
        client = reverb.Client(f"localhost:{server.port}")
        queue = SnapshotQueue(client, builder.network.init(jax.random.PRNGKey(0)), config.probe.max_queued)
        learner = builder.make_learner()
        prober = Prober(config.probe, learner.agent, learner.loss_fn, learner.network)
        snapshot = prober.snapshot(learner.state, learner.current_lr(), 0)
        for step in (10, 20, 30, 40):  # a full queue
            assert queue.offer(snapshot._replace(step=step))
        assert not queue.offer(snapshot._replace(step=50))
        queue.close()  # the end marker has its own place: it neither waits nor evicts
        assert queue.waiting() == 5
        first_key, first = queue.oldest()
        assert first.step == 10
        rdir = RunDir(tmp_path).create()
        metrics = MetricsWriter(rdir, tensorboard=False)
        metrics.write("probe", 10, snapshot_key=str(first_key))  # written by the prober that died
        metrics.close()
        rng = np.random.default_rng(0)
        batch = random_items(builder, 128, rng)
        save_probe_batch(rdir.path, batch)
        assert run_prober(config, f"localhost:{server.port}", rdir.path) == 0
        assert [r["step"] for r in read_metrics(rdir.metrics, "probe")] == [10, 20, 30, 40]
        assert queue.waiting() == 1  # the end marker
        assert run_prober(config, f"localhost:{server.port}", rdir.path) == 0
        assert len(list(read_metrics(rdir.metrics, "probe"))) == 4
        finished = [r for r in read_metrics(rdir.metrics, "event") if r["event"] == "prober_finished"]
        assert [(r["probes"], r["unprobed_snapshots"], r["status"]) for r in finished] == [
            (3, 0, "completed"), (0, 0, "completed")]
    finally:
        server.stop()


def test_the_prober_measures_batch_sharpness_on_fresh_batches(tmp_path, monkeypatch):
    """probe.batch_sharpness_batches in the prober process: K fresh batches of the training
    batch size drawn from replay for each snapshot, measured by the Prober (whose values the
    dense tests of test_probes.py check)."""
    import reverb
    from eosrl.agents import replay
    from eosrl.launch.channels import SnapshotQueue
    from eosrl.launch.prober import run_prober, save_probe_batch
    config = load_config(CONFIGS / "dqn_cartpole.yaml", PROBE + [
        "probe.every=10", "probe.num_eigs=2", "probe.batch_sharpness_batches=2", "replay.batch_size=16",
        "agent.hidden_sizes=[16, 16]"])
    builder = Builder(config)
    rng = np.random.default_rng(0)

    drawn = []

    def sample_items(client, count, signature, table=replay.REPLAY_TABLE):  # replay's items, without a table
        assert table == replay.REPLAY_TABLE and sorted(signature) == sorted(builder.signature())
        drawn.append(count)
        return batches.pop(0)

    batches = [random_items(builder, 16, rng) for _ in range(2)]
    monkeypatch.setattr(replay, "sample_items", sample_items)
    server = replay.start_server([replay.probe_table(config.probe.max_queued)])
    try:
        client = reverb.Client(f"localhost:{server.port}")
        queue = SnapshotQueue(client, builder.network.init(jax.random.PRNGKey(0)), config.probe.max_queued)
        learner = builder.make_learner()
        prober = Prober(config.probe, learner.agent, learner.loss_fn, learner.network)
        snapshot = prober.snapshot(learner.state, 0.01, 0)._replace(step=10)
        assert queue.offer(snapshot)
        queue.close()
        rdir = RunDir(tmp_path).create()
        probe_batch = random_items(builder, 128, rng)
        save_probe_batch(rdir.path, probe_batch)
        assert run_prober(config, f"localhost:{server.port}", rdir.path) == 0
    finally:
        server.stop()
    assert drawn == [16, 16]  # the fixed probe batch came from its file
    (record,) = read_metrics(rdir.metrics, "probe")
    assert record["step"] == 10 and record["batch_sharpness_batches"] == 2
    assert record["batch_sharpness_batch_size"] == 16
    for key in ("batch_sharpness", "batch_lambda_max", "batch_sharpness_over_threshold",
                "batch_lambda_max_over_threshold"):
        assert np.isfinite(record[key]) and record[key] > 0, key
    assert 0 < record["batch_hvps"] < record["hvps"]


def test_the_prober_builds_no_optimiser(monkeypatch):
    """The prober process takes the TD loss, the network and the batch layout, not a
    learner: with every optimiser constructor refusing (ours and optax's), its parts are
    built and measure a snapshot."""
    import optax
    from eosrl.agents import learner as learner_module, optimizers
    from eosrl.agents.probes import ProbeSnapshot
    from eosrl.launch.prober import prober_parts

    def refuse(*args, **kwargs):
        raise AssertionError("the prober built an optimiser")

    monkeypatch.setattr(optimizers, "make_optimizer", refuse)
    monkeypatch.setattr(learner_module, "make_optimizer", refuse)
    for name in ("adam", "sgd", "rmsprop", "chain", "inject_hyperparams"):
        monkeypatch.setattr(optax, name, refuse)
    config = load_config(CONFIGS / "dqn_cartpole.yaml", PROBE + [
        "probe.num_eigs=1", "probe.iterations=10", "agent.hidden_sizes=[16, 16]", "agent.optimizer.name=adam"])
    builder, prober, preprocess = prober_parts(config)
    params, net_state = builder.network.init(jax.random.PRNGKey(0))
    snap = ProbeSnapshot.like(params, net_state)._replace(step=10, lr=1e-3)
    record = prober.probe(snap, preprocess(random_items(builder, 64, np.random.default_rng(0))))
    assert record["step"] == 10 and np.isfinite(record["sharpness"])
    with pytest.raises(AssertionError, match="optimiser"):  # the test can fail: a learner would build one
        builder.make_learner()


def test_snapshots_travel_encoded_by_field_name():
    """Every field of ProbeSnapshot goes through the channel's encoding and comes back:
    trees by the template's structure (an empty SN state included), numbers by type, the
    optional step scaling as an array or None."""
    from eosrl.agents.probes import ProbeSnapshot
    from eosrl.launch.channels import decode_snapshot, encode_snapshot
    params = {"dense_0": {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}}
    like = ProbeSnapshot.like(params, {})
    for scaling in (None, np.arange(8, dtype=np.float32)):
        snap = ProbeSnapshot(params, params, {}, {}, scaling, step=7, lr=0.25, env_steps=123)
        back = decode_snapshot([np.asarray(x) for x in encode_snapshot(snap)], like)
        assert back._fields == snap._fields
        assert (back.step, back.lr, back.env_steps) == (7, 0.25, 123)
        assert type(back.step) is int and type(back.lr) is float
        assert back.net_state == {} and back.target_net_state == {}
        np.testing.assert_array_equal(back.target_params["dense_0"]["w"], params["dense_0"]["w"])
        assert (back.step_scaling is None) == (scaling is None)
        if scaling is not None:
            np.testing.assert_array_equal(back.step_scaling, scaling)
    with pytest.raises(ValueError, match="fields"):
        decode_snapshot([np.asarray([1, 2], np.int64), np.ones(1), np.ones(1)], like)
