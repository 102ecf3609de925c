"""Nothing deleted that is not a run, nothing orphaned, nothing misreported.

Each test here reproduces a failure found in review (issue 12) and checks that it
is gone: `--overwrite` on folders that are not runs, a launcher killed with
SIGKILL, a diverging learner, a replay server killed mid-run, a corrupt
checkpoint or dataset, non-finite config values, the evaluation schedule on resume.
"""
import os
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from eosrl.agents import checkpoint
from eosrl.launch.config import ConfigError, load_config
from conftest import CONFIGS, ROOT
from processes import alive, eosrl, events, kill_launch, pids, wait_for
from eosrl.launch import cli
from eosrl.launch.rundir import read_metrics, without_superseded

CARTPOLE = str(CONFIGS / "dqn_cartpole.yaml")
QUICK = ["--no-progress", "--set", "run.eval_every=0", "--set", "run.eval_episodes=2",
         "--set", "replay.min_size=500", "--set", "run.log_every=200"]


# ----------------------------------------------------------------------------
# 1. --overwrite deletes runs and nothing else.


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*"))


@pytest.mark.parametrize("args, says", [
    (["--run-dir", "X", "--overwrite"], "X is not an eosrl run directory"),  # an unrelated folder
    (["--set", "name=.", "--overwrite"], "name: must be"),                  # would be runs/ itself
    (["--set", "name=..", "--overwrite"], "name: must be"),                 # would be the working directory
])
def test_overwrite_refuses_what_is_not_a_run(tmp_path, monkeypatch, capsys, args, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "X").mkdir()
    (tmp_path / "X" / "thesis.tex").write_text("months of work")
    (tmp_path / "runs" / "other").mkdir(parents=True)
    (tmp_path / "runs" / "other" / "keep.txt").write_text("an earlier run's notes")
    (tmp_path / "notes.md").write_text("the working directory")
    before = _tree(tmp_path)
    assert cli.main(["train", CARTPOLE, *args]) == 2
    assert _tree(tmp_path) == before
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("eosrl: error:") and says in error[0]


def test_overwrite_deletes_a_run_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "old"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("name: old\n")
    (run / "metrics.jsonl").write_text("")
    (run / "checkpoints" / "ckpt_0000000001.npz").write_bytes(b"x" * 10)
    cli._delete_run(Path("runs/old"))
    assert not run.exists() and (tmp_path / "runs").is_dir()
    assert "deleting the run in runs/old (3 files" in capsys.readouterr().err
    with pytest.raises(cli.UsageError, match="working directory"):
        (tmp_path / "config.yaml").write_text("name: x\n")
        (tmp_path / "metrics.jsonl").write_text("")
        cli._delete_run(Path("."))


# ----------------------------------------------------------------------------
# 7 (smaller ones): values that type-check but are not numbers; corrupt inputs.


@pytest.mark.parametrize("override", ["agent.optimizer.lr=.nan", "agent.optimizer.lr=.inf",
                                      "agent.huber_delta=.nan", "agent.optimizer.max_grad_norm=.nan"])
def test_non_finite_values_are_refused(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(CARTPOLE, [override])


def test_corrupt_newest_checkpoint_falls_back_to_an_intact_one(tmp_path, capsys):
    tree = {"w": np.arange(4, dtype=np.float32)}
    checkpoint.save(tmp_path, 1, tree, {"env_steps": 10})
    newest = checkpoint.save(tmp_path, 2, tree, {"env_steps": 20})
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, a flipped byte: only the zip CRC can tell
    newest.write_bytes(bytes(data))
    found = checkpoint.latest(tmp_path)
    assert found is not None and found.name == "ckpt_0000000001.npz"
    warning = capsys.readouterr().err
    assert "ckpt_0000000002.npz" in warning and "falling back" in warning


def test_corrupt_dataset_is_refused_before_the_run_dir_exists(tmp_path, monkeypatch, capsys):
    from eosrl.agents.dataset import DatasetWriter
    from eosrl.envs.config import EnvConfig
    data = tmp_path / "data"
    env = EnvConfig(kind="gym", id="CartPole-v1")
    rng = np.random.default_rng(0)
    with DatasetWriter.for_env(data, env) as writer:
        for _ in range(3):
            writer.add_first(rng.normal(size=4).astype(np.float32))
            for t in range(20):
                writer.add(int(rng.integers(2)), 1.0, t == 19, False, rng.normal(size=4).astype(np.float32))
    shard = sorted(data.glob("*.npz"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    monkeypatch.chdir(tmp_path)
    code = cli.main(["train", CARTPOLE, "--run-dir", "offline", "--set", "regime.mode=offline",
                     "--set", f"regime.dataset={data}", "--set", "run.total_updates=10"])
    assert code == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert not (tmp_path / "offline").exists()


def test_resume_refuses_a_checkpoint_whose_items_have_another_layout(tmp_path, capsys):
    """Breaks if a run whose fixed probe batch (or replay snapshot) holds items of the
    layouts before the one-field `rows` items resumes into a confusing error later, or if
    a checkpoint with neither (its learner state does not depend on the layout) is refused."""
    from eosrl.launch.config import save_config
    from eosrl.agents.replay import ITEM_FIELDS
    from eosrl.launch.resume import UNPACKED_ITEM_FIELDS, item_layout_problem
    run = tmp_path / "old"
    (run / "checkpoints").mkdir(parents=True)
    save_config(load_config(CARTPOLE), run / "config.yaml")
    checkpoint.save(run / "checkpoints", 100, {"w": np.zeros(2)}, {"env_steps": 100, "has_probe_batch": True})
    code = cli.main(["train", "--resume", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "probe batch" in err[0] and "start a new run" in err[0] and ", ".join(UNPACKED_ITEM_FIELDS) in err[0]
    assert item_layout_problem({"has_probe_batch": False}) is None  # nothing of the old layout to read
    packed_cell = {"has_probe_batch": True, "item_fields": ["next_obs", "obs", "transition"]}  # 2026-12-04 (2nd)
    assert "next_obs, obs, transition" in item_layout_problem(packed_cell)
    assert item_layout_problem({"has_probe_batch": True, "item_fields": list(ITEM_FIELDS)}) is None


def test_metrics_reach_the_file_at_once_and_actor_records_are_fsynced_at_most_once_a_second(tmp_path, monkeypatch):
    """Breaks if a record waits in a buffer (a crashed process would lose it), if a
    `train`, `eval`, `probe` or `event` record is not fsynced as it is written, or if
    per-episode `actor` records each pay an fsync (~160 µs here, hundreds a second)."""
    from eosrl.launch import rundir
    synced = []
    monkeypatch.setattr(rundir.os, "fsync", lambda fd: synced.append(fd))
    writer = rundir.MetricsWriter(rundir.RunDir(tmp_path).create(), tensorboard=False)
    for i in range(200):
        writer.write("actor", 0, episode_return=float(i))
    assert len(list(read_metrics(tmp_path / "metrics.jsonl", "actor"))) == 200  # on the OS's side already
    assert len(synced) <= 2
    after_actor = len(synced)
    for kind in ("train", "eval", "probe", "event"):
        before = len(synced)
        writer.write(kind, 1, **({"event": "x"} if kind == "event" else {}))
        assert len(synced) == before + 1, kind
    writer.close()
    writer.close()  # idempotent
    assert len(synced) == after_actor + 5  # and once more when it closes


def test_a_resume_supersedes_the_records_of_the_updates_it_makes_again():
    """The crashed run's records after its last checkpoint (update 200) stay in the file but
    not in the history that plots and study tables read; events and other kinds stay."""
    def record(kind, step, **values):
        return {"kind": kind, "step": step, **values}

    records = [record("train", 100), record("train", 200), record("probe", 200), record("train", 300),
               record("probe", 300), record("eval", 300), record("actor", 0, env_steps=900),
               record("event", 300, event="divergence"),
               record("event", 200, event="resumed"), record("train", 300, again=True),
               record("event", 250, event="resumed"), record("train", 300, again=2), record("eval", 300)]
    history = without_superseded(records)
    assert [(r["kind"], r["step"], r.get("again")) for r in history if r["kind"] in ("train", "probe", "eval")] == [
        ("train", 100, None), ("train", 200, None), ("probe", 200, None), ("train", 300, 2), ("eval", 300, None)]
    assert [r for r in history if r["kind"] in ("actor", "event")] == [r for r in records if r["kind"] in
                                                                       ("actor", "event")]


# ----------------------------------------------------------------------------
# 3 and 2. A launcher killed with SIGKILL leaves no process; it says where replay listens.


def test_a_stop_that_cpp_code_replaced_by_another_error_is_still_a_stop():
    """pybind11 replaces a `Stop` raised while it builds an exception of its own (TF's
    status error from a Reverb dataset) by a RuntimeError; the learner must still end
    as `interrupted`, not `completed` or `failed`."""
    from eosrl.launch.lifeline import Stop, stop_on_signals

    def cpp_call():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)  # the handler runs here and raises Stop
        except Stop:
            raise RuntimeError("MISMATCH of original and normalized active exception types: "
                               "ORIGINAL _NotOkStatusException REPLACED BY Stop")

    with stop_on_signals() as signals:
        with pytest.raises(RuntimeError) as caught:
            cpp_call()
    assert signals.received == signal.SIGTERM and signals.stopped(caught.value)
    with stop_on_signals() as signals:
        assert not signals.stopped(RuntimeError("a real failure"))
        assert signals.stopped(Stop())


@pytest.mark.slow
def test_sigkilled_launcher_leaves_no_process_and_said_where_replay_listens(tmp_path):
    import portpicker
    port = portpicker.pick_unused_port()
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(eosrl("launch", CARTPOLE, "--actors", "1", "--run-dir", str(run_dir),
                                       "--replay-port", str(port), *QUICK, "--set", "run.total_env_steps=200000"),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: {"learner", "actor_0", "evaluator", "replay"} <= set(pids(run_dir)), 120, "every role")
        wait_for(lambda: list(read_metrics(run_dir / "metrics.jsonl", "train")), 180, "learning")
        roles = {k: v for k, v in pids(run_dir).items() if k != "launcher"}
        launcher.kill()
        _, stderr = launcher.communicate(timeout=10)
        started = time.time()
        wait_for(lambda: not any(alive(pid) for pid in roles.values()), 15, "every role to end")
        assert time.time() - started < 15
    finally:
        kill_launch(launcher, run_dir)
    assert f"replay server on port {port} of every network interface, without authentication" in stderr
    assert f"listening on port {port}" in (run_dir / "logs" / "replay.log").read_text()
    # They ended the clean way: the learner wrote its final checkpoint.
    assert [e["status"] for e in events(run_dir, "learner_finished")] == ["interrupted"]


# ----------------------------------------------------------------------------
# 4. Divergence is reported as divergence, at its update, and stops the learner at once.


@pytest.mark.slow
def test_launch_reports_divergence_at_its_update_and_never_evaluates_nan(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        eosrl("launch", CARTPOLE, "--actors", "1", "--run-dir", str(run_dir), *QUICK,
               "--set", "agent.optimizer.name=sgd", "--set", "agent.optimizer.lr=1e6",
               "--set", "agent.optimizer.momentum=0.0", "--set", "run.total_env_steps=20000",
               "--set", "run.eval_every=1", "--set", "run.log_every=5000", "--set", "run.checkpoint_every=1",
               "--set", "replay.checkpoint=false"),
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    [divergence] = events(run_dir, "divergence")
    update = divergence["step"]
    assert divergence["reason"] == "non-finite loss" and divergence["loss"] in ("nan", "inf", "-inf")
    assert f"the learner diverged: the TD loss became non-finite at update {update}" in result.stderr
    assert "learner_died" not in result.stdout and "--resume" not in result.stderr
    assert "Run diverged" in result.stdout and "final evaluation" not in result.stdout
    [finished] = events(run_dir, "learner_finished")
    assert finished["status"] == "diverged" and finished["diverged_at"] == update
    assert finished["step"] <= update + 1  # stopped within one update, not at the next log
    # The train record of that window shows the non-finite loss at once.
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl", "train")] == [finished["step"]]
    # Only finite parameters were evaluated or saved.
    assert all(r["step"] < update for r in read_metrics(run_dir / "metrics.jsonl", "eval"))
    for path in checkpoint.list_checkpoints(run_dir / "checkpoints"):
        assert checkpoint.read_meta(path)["learner_step"] < update


@pytest.mark.slow
def test_train_reports_divergence_at_its_update(tmp_path):
    from eosrl.launch.train import train
    config = load_config(CARTPOLE, ["agent.optimizer.name=sgd", "agent.optimizer.lr=1e6",
                                    "agent.optimizer.momentum=0.0", "run.total_env_steps=5000",
                                    "replay.min_size=500", "run.log_every=4000", "run.eval_every=1000",
                                    "run.eval_episodes=1", "replay.checkpoint=false"])
    summary = train(config, tmp_path / "run", progress=False)
    assert summary["status"] == "diverged" and summary["final_eval_return"] is None
    [divergence] = events(tmp_path / "run", "divergence")
    update = divergence["step"]
    assert 0 < update < 4000 and f"non-finite at update {update}" in summary["message"]
    train_records = list(read_metrics(tmp_path / "run" / "metrics.jsonl", "train"))
    assert [r["step"] for r in train_records] == [summary["learner_updates"]]
    assert summary["learner_updates"] <= update + 1
    assert all(r["step"] < update for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "eval"))


# ----------------------------------------------------------------------------
# 6. Env steps survive a replay-server kill: the resumed run ends exactly at its budget.


@pytest.mark.slow
def test_replay_server_kill_then_resume_ends_at_the_budget(tmp_path):
    run_dir = tmp_path / "run"
    # n_step 1: every env step is one replay insert, so the count can be checked exactly.
    sets = [*QUICK, "--set", "agent.n_step=1", "--set", "run.checkpoint_every=1000",
            "--set", "run.total_env_steps=6000"]
    launcher = subprocess.Popen(eosrl("launch", CARTPOLE, "--actors", "2", "--run-dir", str(run_dir), *sets),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: checkpoint.latest(run_dir / "checkpoints") is not None, 240, "a first checkpoint")
        os.kill(pids(run_dir)["replay"], signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=60)
    finally:
        kill_launch(launcher, run_dir)
    assert launcher.returncode == 1
    assert "the replay server exited with code -9" in stderr and f"eosrl launch --resume {run_dir}" in stderr
    saved = checkpoint.read_meta(checkpoint.latest(run_dir / "checkpoints"))
    assert 0 < saved["env_steps"] < 6000

    resumed = subprocess.run(eosrl("launch", "--resume", str(run_dir), "--no-progress"),
                             cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    finished = events(run_dir, "learner_finished")[-1]
    assert finished["status"] == "completed"
    assert finished["env_steps"] == 6000  # not restarted at 0, not past the budget
    # The env-step count goes on from the checkpoint: sorted before the kill, and from the
    # checkpoint's count on after the resume. (`train` records the learner wrote between its
    # last checkpoint and the kill stay in the file, above the resumed count; the kill comes
    # up to one 0.5 s poll after the checkpoint.)
    records = list(read_metrics(run_dir / "metrics.jsonl"))
    resume_at = next(i for i, r in enumerate(records) if r.get("event") == "resumed")
    before = [r["env_steps"] for r in records[:resume_at] if r["kind"] == "train"]
    after = [r["env_steps"] for r in records[resume_at:] if r["kind"] == "train"]
    assert before == sorted(before) and after == sorted(after) and after
    assert after[0] >= saved["env_steps"]
    history = [r for r in without_superseded(records) if r["kind"] == "train"]  # what plots read
    assert [r["step"] for r in history] == sorted({r["step"] for r in history})
    assert [r["env_steps"] for r in history] == sorted(r["env_steps"] for r in history)
    actors = list(read_metrics(run_dir / "metrics.jsonl", "actor"))
    assert max(r["env_steps"] for r in actors if r["actor"] == 0) <= 3000
    # Item 7: the actors' writers keep their unconfirmed items below the level at which
    # Reverb floods its log (a window of 64 gave 513 warnings in one 20k-step launch).
    assert "alarmingly high" not in (run_dir / "logs" / "native.log").read_text()


# ----------------------------------------------------------------------------
# 7. The evaluation schedule keeps its multiples across a resume.


@pytest.mark.slow
def test_evaluation_schedule_survives_resume(tmp_path):
    from eosrl.launch.train import train
    sets = ["run.total_env_steps=1500", "replay.min_size=500", "run.eval_every=400", "run.eval_episodes=1",
            "run.checkpoint_every=1000", "run.log_every=500", "replay.checkpoint=false"]
    train(load_config(CARTPOLE, sets), tmp_path / "run", progress=False)
    config = load_config(CARTPOLE, [*sets, "run.total_env_steps=2500"])
    train(config, tmp_path / "run", resume=True, progress=False)
    evals = list(read_metrics(tmp_path / "run" / "metrics.jsonl", "eval"))
    # Every 400 updates (eval_every counts env steps, one update each after the 500 of warm-up),
    # then the final evaluation of each run. The resumed run starts at update 1000 with an
    # empty table (no replay snapshots), warms up again, and evaluates at update 1200, the
    # next multiple of 400, not at 1400, 400 after the resume point.
    assert [r["step"] for r in evals] == [400, 800, 1000, 1200, 1500]
    assert [r["env_steps"] for r in evals] == [900, 1300, 1500, 2200, 2500]


# ----------------------------------------------------------------------------
# 5. What run.seed covers: everything up to the first sampled batch (README, Reproducibility).


def _warmup_dataset(tmp_path, name, seed):
    from eosrl.agents.dataset import DatasetReader
    from eosrl.launch.train import train
    data = tmp_path / name / "dataset"
    train(load_config(CARTPOLE, [f"run.seed={seed}", "run.total_env_steps=600", "replay.min_size=600",
                                 "run.eval_every=0", "run.eval_episodes=1", "replay.checkpoint=false",
                                 f"replay.record_to={data}"]), tmp_path / name, progress=False)
    return [e.frames for e in DatasetReader(data).iter_episodes()], DatasetReader(data).load_shard(0)


@pytest.mark.slow
def test_same_seed_gives_the_same_run_up_to_the_first_sampled_batch(tmp_path):
    from eosrl.launch.builder import Builder
    frames_a, rows_a = _warmup_dataset(tmp_path, "a", seed=3)
    frames_b, rows_b = _warmup_dataset(tmp_path, "b", seed=3)
    frames_c, _ = _warmup_dataset(tmp_path, "c", seed=4)
    assert len(frames_a) == len(frames_b) > 5
    for a, b in zip(frames_a, frames_b):
        np.testing.assert_array_equal(a, b)
    for key in rows_a:
        np.testing.assert_array_equal(rows_a[key], rows_b[key])
    assert len(frames_a) != len(frames_c) or any(not np.array_equal(a, c) for a, c in zip(frames_a, frames_c))
    init = [Builder(load_config(CARTPOLE, [f"run.seed={s}"])).make_learner().state.params for s in (3, 3, 4)]
    leaves = [np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(p)]) for p in init]
    np.testing.assert_array_equal(leaves[0], leaves[1])
    assert not np.array_equal(leaves[0], leaves[2])
