"""Distributed runs: roles as real OS processes exchanging data through Reverb.

These tests start real processes and really kill them (SIGKILL, Ctrl-C)."""
import os
import re
import signal
import subprocess
import time

import pytest

from eosrl.agents import checkpoint
from conftest import CONFIGS, ROOT
from processes import alive, eosrl, events, has_checkpoint, kill_launch, pids, wait_for
from eosrl.launch.rundir import read_metrics

# Learning, launches and studies take seconds to minutes each: `make test-fast` leaves them out.
pytestmark = pytest.mark.slow

QUICK = ["--set", "run.eval_every=0", "--set", "run.eval_episodes=2", "--set", "replay.min_size=500",
         "--set", "run.log_every=200", "--set", "run.checkpoint_every=1000"]


def _start_launch(run_dir, *extra, sigint_ignored=False):
    """`sigint_ignored`: start it as a script's `eosrl launch ... &` would, with SIGINT ignored."""
    cmd = eosrl("launch", str(CONFIGS / "dqn_cartpole.yaml"), "--actors", "2", "--run-dir", str(run_dir),
                 "--no-progress", *QUICK, *extra)
    # An ignored disposition survives exec, so the child starts with it as from a shell.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if sigint_ignored else None
    try:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        if sigint_ignored:
            signal.signal(signal.SIGINT, previous)


@pytest.mark.xdist_group("learning")  # CPU-bound: never beside another learning run (Makefile, test)
def test_launch_learns_cartpole(tmp_path):
    """replay + 2 actors + learner + evaluator; the evaluation return reaches 400; with
    its output captured (not a terminal), progress comes as a few plain lines.

    C51, because DQN's CartPole evaluations swing (tests/test_learning.py): one distributed
    DQN run measured here reached 446 at best, with 3 of 12 evaluations ≥ 400, where C51
    held 500 from 7.5k of 20k steps on."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        eosrl("launch", str(CONFIGS / "c51_cartpole.yaml"), "--actors", "2", "--run-dir", str(run_dir),
               "--set", "run.eval_every=2500", "--set", "run.eval_episodes=5",
               "--set", "run.total_env_steps=20000"),
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Run completed" in result.stdout
    assert "\r" not in result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("progress: ")]
    # The last line counts every env step written (up to n_step - 1 of a cut episode are not).
    assert progress and re.match(r"progress: (199\d\d|20000)/20000 steps \(100%\)", progress[-1]), result.stderr[-2000:]
    assert len(result.stderr.splitlines()) < 50, result.stderr[-2000:]
    evals = list(read_metrics(run_dir / "metrics.jsonl", "eval"))
    assert evals and max(r["return_mean"] for r in evals) >= 400
    actors = {r["actor"] for r in read_metrics(run_dir / "metrics.jsonl", "actor")}
    assert actors == {0, 1}
    assert all(not alive(pid) for pid in pids(run_dir).values())


def test_roles_started_by_address(tmp_path):
    """Each role started alone with the server's address, as on several machines."""
    import portpicker
    port = portpicker.pick_unused_port()
    run_dir = tmp_path / "run"
    config = str(CONFIGS / "dqn_cartpole.yaml")
    sets = ["--set", "run.total_env_steps=1500", "--set", "replay.min_size=500", "--set", "run.log_every=200",
            "--set", "run.checkpoint_every=500"]
    address = f"localhost:{port}"
    procs = [subprocess.Popen(eosrl("replay-server", config, "--port", str(port), *sets), cwd=ROOT)]
    try:
        procs.append(subprocess.Popen(eosrl("learner", config, "--replay", address, "--run-dir", str(run_dir), *sets), cwd=ROOT))
        procs.append(subprocess.Popen(eosrl("actor", config, "--replay", address, "--id", "0", "--num-actors", "1",
                                             "--run-dir", str(run_dir), *sets), cwd=ROOT))
        assert procs[1].wait(timeout=300) == 0
        assert procs[2].wait(timeout=60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)
    train = list(read_metrics(run_dir / "metrics.jsonl", "train"))
    assert train and train[-1]["step"] == 1000  # (1500 - 500) / update_period 1
    assert has_checkpoint(run_dir)
    assert list(read_metrics(run_dir / "metrics.jsonl", "actor"))


def test_actor_kill_restart_then_ctrl_c_stops_everything_and_resume_continues(tmp_path):
    run_dir = tmp_path / "run"
    launcher = _start_launch(run_dir, "--set", "run.total_env_steps=200000", sigint_ignored=True)
    try:
        wait_for(lambda: "actor_0" in pids(run_dir), 120, "actors to start")
        wait_for(lambda: has_checkpoint(run_dir), 240, "a first checkpoint")
        victim = pids(run_dir)["actor_0"]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: events(run_dir, "actor_restarted"), 60, "the actor restart event")
        wait_for(lambda: pids(run_dir).get("actor_0") not in (None, victim), 30, "a new actor_0")
        assert launcher.poll() is None  # the learner kept going
        roles = pids(run_dir)
        started = time.time()
        launcher.send_signal(signal.SIGINT)
        launcher.wait(timeout=30)
        assert time.time() - started < 15
    finally:
        kill_launch(launcher, run_dir)
    assert all(not alive(pid) for pid in roles.values()), roles
    last = checkpoint.latest(run_dir / "checkpoints")
    saved_step = checkpoint.read_meta(last)["learner_step"]
    finished = events(run_dir, "learner_finished")
    assert finished and finished[-1]["status"] == "interrupted"
    assert finished[-1]["step"] == saved_step  # the final checkpoint is the learner's last state

    # Resume continues the learner's step counter, with the replay reloaded.
    resumed = subprocess.run(eosrl("launch", "--resume", str(run_dir), "--no-progress",
                                    "--set", f"run.total_env_steps={checkpoint.read_meta(last)['env_steps'] + 1500}"),
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    event = events(run_dir, "resumed")[-1]
    assert event["step"] == saved_step
    assert event["replay_size"] > 0
    train = [r for r in read_metrics(run_dir / "metrics.jsonl", "train") if r["step"] > saved_step]
    assert train, "the resumed learner logged no updates"


def test_learner_death_stops_run_with_message(tmp_path):
    run_dir = tmp_path / "run"
    launcher = _start_launch(run_dir, "--set", "run.total_env_steps=200000")
    try:
        wait_for(lambda: has_checkpoint(run_dir), 240, "a first checkpoint")
        roles = pids(run_dir)
        os.kill(roles["learner"], signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=60)
    finally:
        kill_launch(launcher, run_dir)
    assert launcher.returncode == 1
    assert "learner exited" in stderr and "--resume" in stderr
    assert all(not alive(pid) for pid in roles.values())
    checkpoint.load(checkpoint.latest(run_dir / "checkpoints"), _template())


def _template():
    from eosrl.launch.config import load_config
    from eosrl.launch.builder import Builder
    learner = Builder(load_config(CONFIGS / "dqn_cartpole.yaml")).make_learner()
    return {"learner": learner.state, "extra": {}}


def _assert_final_evaluation(run_dir):
    """Both launchers end a completed run alike: the final checkpoint evaluated as
    `eosrl evaluate` does, then a random policy on the same episodes."""
    final = list(read_metrics(run_dir / "metrics.jsonl", "eval"))[-1]
    assert final["source"] == "eosrl evaluate"
    random = events(run_dir, "random_policy")
    assert random and random[-1]["episodes"] == final["episodes"]
    finished = events(run_dir, "finished")[-1]
    assert finished["final_eval_return"] == final["return_mean"]
    assert finished["random_policy_return"] == random[-1]["return_mean"]


def test_ray_launcher_runs_a_short_job_and_restarts_a_killed_actor(tmp_path):
    """No skip where Ray is missing: `make test` installs the [ray] extra, and the
    launcher then fails with the line saying how to install it."""
    run_dir = tmp_path / "ray"
    launcher = subprocess.Popen(
        eosrl("launch", str(CONFIGS / "dqn_cartpole.yaml"), "--launcher", "ray", "--actors", "1",
               "--run-dir", str(run_dir), "--no-progress", "--set", "run.total_env_steps=1500",
               "--set", "replay.min_size=500", "--set", "run.eval_every=500", "--set", "run.eval_episodes=2",
               "--set", "run.log_every=250", "--set", "probe.enabled=true", "--set", "probe.mode=process",
               "--set", "probe.every=250", "--set", "probe.batch_size=128", "--set", "probe.num_eigs=3",
               "--set", "probe.max_queued=8"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The actor is killed as soon as it runs; the one started in its place does its share.
        wait_for(lambda: "actor_0" in pids(run_dir) or launcher.poll() is not None, 180, "the Ray actor")
        assert launcher.poll() is None, launcher.communicate()[1][-2000:]
        os.kill(pids(run_dir)["actor_0"], signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=400)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
    assert launcher.returncode == 0, stderr[-2000:]
    restarted = events(run_dir, "actor_restarted")
    assert [(e["actor"], e["restart"]) for e in restarted] == [(0, 1)]
    train = list(read_metrics(run_dir / "metrics.jsonl", "train"))
    assert train and train[-1]["step"] == 1000
    # The prober ran as a Ray actor and probed every snapshot before the run ended.
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl", "probe")] == [250, 500, 750, 1000]
    assert list(read_metrics(run_dir / "metrics.jsonl", "actor"))
    assert has_checkpoint(run_dir)
    assert any((run_dir / "replay").iterdir())  # the final table checkpoint, asked for at shutdown
    _assert_final_evaluation(run_dir)


def test_launch_offline_and_offline_to_online(tmp_path):
    """The replay server loads the dataset; offline, nobody acts and the learner runs
    `total_updates`; offline-to-online, actors add their steps and the learner
    starts at once, as `eosrl train` does in these regimes."""
    from eosrl.launch.config import load_config
    from eosrl.launch.train import train
    data = tmp_path / "collect" / "dataset"
    train(load_config(CONFIGS / "dqn_cartpole.yaml", [
        "run.total_env_steps=1000", "replay.min_size=500", "run.eval_every=0", "run.eval_episodes=1",
        "replay.checkpoint=false", f"replay.record_to={data}"]), tmp_path / "collect", progress=False)
    common = ["--no-progress", "--set", f"regime.dataset={data}", "--set", "run.eval_episodes=1",
              "--set", "run.log_every=100", "--set", "replay.checkpoint=false", "--set", "replay.min_size=500"]

    offline = tmp_path / "offline"
    result = subprocess.run(eosrl("launch", str(CONFIGS / "dqn_cartpole.yaml"), "--actors", "2",
                                   "--run-dir", str(offline), *common, "--set", "regime.mode=offline",
                                   "--set", "regime.subset=last 600", "--set", "run.total_updates=300",
                                   "--set", "run.eval_every=150"),
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [e["transitions"] for e in events(offline, "dataset_loaded")] == [600]
    finished = events(offline, "learner_finished")[-1]
    assert finished["status"] == "completed" and finished["step"] == 300 and finished["env_steps"] == 0
    assert not list(read_metrics(offline / "metrics.jsonl", "actor")) and not (offline / "logs" / "actor_0.log").exists()
    assert list(read_metrics(offline / "metrics.jsonl", "eval"))  # the policy is still measured
    _assert_final_evaluation(offline)

    mixed = tmp_path / "o2o"
    result = subprocess.run(eosrl("launch", str(CONFIGS / "dqn_cartpole.yaml"), "--actors", "1",
                                   "--run-dir", str(mixed), *common, "--set", "regime.mode=offline_to_online",
                                   "--set", "run.total_env_steps=400", "--set", "run.eval_every=0"),
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [e["transitions"] for e in events(mixed, "dataset_loaded")] == [1000]
    finished = events(mixed, "learner_finished")[-1]
    # 1000 preloaded >= min_size: an update per env step from the first one (update_period 1).
    assert finished["status"] == "completed" and finished["step"] == 400
    # Env steps count the actor's transitions only (an episode cut at the end leaves
    # up to n_step - 1 of them unwritten).
    assert 398 <= finished["env_steps"] <= 400
    assert list(read_metrics(mixed / "metrics.jsonl", "actor"))
