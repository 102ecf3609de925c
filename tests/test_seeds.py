"""Seeds as one program (agents/seeds.py, launch/train_seeds.py): a vmapped seed's records,
probes and final state equal its lone run's, bit for bit on the CPU, in a process that
cannot import Reverb or TensorFlow; seeds resumed at different updates catch up; a
study runs an offline cell's seeds as one child. Step sizes too: runs at different lrs
as one program equal their lone runs, and a study's grid over lr is one job."""
import argparse
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import CONFIGS
from eosrl.agents import offline
from eosrl.launch.builder import Builder
from eosrl.agents.dataset import DatasetWriter
from eosrl.agents.seeds import SeedBatch
from eosrl.launch.config import load_config, save_config
from eosrl.launch.rundir import read_metrics
from eosrl.launch.train import train
from eosrl.launch.train_seeds import check_together, runs_of_args, seed_config, train_seeds

TIMING = ("updates_per_second", "seconds", "wall_seconds", "time", "env_steps_per_second")


def _record(path, lengths=(30, 20, 45, 25, 40), seed=0):
    """A small CartPole dataset of random transitions (tests/test_offline_device.py's kind)."""
    config = load_config(CONFIGS / "dqn_cartpole.yaml")
    spec, rng = Builder(config).spec, np.random.default_rng(seed)
    writer = DatasetWriter.for_env(path, config.env, shard_size=97)
    for i, length in enumerate(lengths):
        writer.add_first(rng.normal(size=spec.obs_shape).astype(spec.obs_dtype))
        for t in range(length):
            last = t == length - 1 and i < len(lengths) - 1
            writer.add(int(rng.integers(spec.num_actions)), float(rng.normal()), last, False,
                       rng.normal(size=spec.obs_shape).astype(spec.obs_dtype))
    writer.close()


def _run_records(path):
    """(records without timing fields, as JSON; the newest checkpoint's arrays)."""
    records = [r for r in read_metrics(path / "metrics.jsonl") if r["kind"] in ("train", "probe", "eval", "event")]
    for r in records:
        for key in TIMING:
            r.pop(key, None)
        r.pop("checkpoint", None)  # a resumed event names its checkpoint's path
        r.pop("run_dir", None)
    with np.load(sorted((path / "checkpoints").glob("ckpt_*.npz"))[-1]) as arrays:
        state = {key: arrays[key] for key in arrays.files}
    return json.dumps(records, sort_keys=True), state


def _same(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for key in a[1]:  # the learner state (the sampler's key included) and the probe batch
        np.testing.assert_array_equal(a[1][key], b[1][key], err_msg=key)


def _config_args(tmp_path, extra=()):
    return ["regime.mode=offline", f"regime.dataset={tmp_path / 'data'}", "replay.batch_size=32",
            "agent.target_update_period=4", "run.eval_every=30", "run.eval_episodes=1", "run.log_every=10",
            "run.checkpoint_every=20", "replay.checkpoint=false"] + list(extra)


def _config(tmp_path, extra=()):
    if not (tmp_path / "data").exists():
        _record(tmp_path / "data")
    return load_config(CONFIGS / "dqn_cartpole.yaml", _config_args(tmp_path, extra))


def test_a_seed_batch_equals_its_learners_run_alone(tmp_path):
    """SeedBatch on one shared dataset: each of two seeds' state after 5 + 4 vmapped updates is its
    lone learner's, bit for bit (XLA:CPU gives the same floats batched; the MinAtar CNN
    was checked the same way by hand, max |Δ| 0.0 after 9 updates)."""
    builders = [Builder(seed_config(_config(tmp_path, ["run.total_updates=9"]), seed)) for seed in (0, 1)]
    data, lone, together = _alone_and_together(builders)
    batch = SeedBatch(together, data)
    batch.run(5)
    windows = batch.run(4, members=[0, 1])
    assert [w.count for w in windows] == [4, 4] and [learner.step for learner in together] == [9, 9]
    _assert_same_states(lone, together)


def _alone_and_together(builders):
    """(the dataset on the device, the builders' learners after 5 + 4 updates each alone,
    fresh learners of the same builders for a SeedBatch)."""
    data, _ = offline.load(builders[0])
    lone, together = [b.make_learner() for b in builders], [b.make_learner() for b in builders]
    for learner in lone:
        learner.run(data, 5), learner.run(data, 4)
    return data, lone, together


def _assert_same_states(lone, together):
    for a, b in zip(lone, together):
        for x, y in zip(jax.tree_util.tree_leaves(a.state), jax.tree_util.tree_leaves(b.state)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_vmapped_seeds_records_equal_its_lone_runs_without_reverb_or_tensorflow(tmp_path):
    """`train_seeds` in a process where Reverb and TensorFlow cannot be imported (the path
    imports neither: layout, offline, learner, seeds, builder, the loop, train_seeds),
    with each seed's own random subset and corrupted actions (each seed's dataset on
    the device, stacked), probes (each seed's Prober warm-starts from its own last
    eigenvectors), evaluations and checkpoints: every record of seed 1 (but timings and
    its run directory's name) and its final state equal its lone `eosrl train`'s, bit
    for bit."""
    extra = ["regime.subset=random 120", "regime.corruption=0.2", "probe.enabled=true", "probe.every=20",
             "probe.num_eigs=2", "probe.batch_size=32", "run.eval_every=20", "run.total_updates=40",
             "probe.dataset_every=40", "probe.dataset_transitions=50"]
    config = _config(tmp_path, extra)
    script = f"""
import sys
sys.modules["reverb"] = None
sys.modules["tensorflow"] = None
from eosrl.launch.config import load_config
from eosrl.launch.train_seeds import train_seeds
config = load_config({str(CONFIGS / "dqn_cartpole.yaml")!r}, {_config_args(tmp_path, extra)!r})
out = train_seeds(config, {{0: {str(tmp_path / 'v_seed-0')!r}, 1: {str(tmp_path / 'v_seed-1')!r}}}, progress=False)
assert [(s["status"], s["learner_updates"]) for s in out.values()] == [("completed", 40)] * 2, out
assert sys.modules["reverb"] is None and sys.modules["tensorflow"] is None  # (rlax's tensorflow_probability.substrates.jax is pure JAX)
assert not [name for name in sys.modules if name.startswith(("reverb.", "tensorflow."))]
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    train(seed_config(config, 1), tmp_path / "lone_seed-1", progress=False)
    _same(_run_records(tmp_path / "v_seed-1"), _run_records(tmp_path / "lone_seed-1"))
    probes = list(read_metrics(tmp_path / "v_seed-1" / "metrics.jsonl", "probe"))
    assert [len(r["eigenvalues"]) for r in probes] == [2, 2]
    assert [r.get("dataset_transitions") for r in probes] == [None, 50]  # each seed measures its own dataset
    assert _run_records(tmp_path / "v_seed-0")[0] != _run_records(tmp_path / "v_seed-1")[0]  # seeds differ


@pytest.mark.slow  # three offline runs
def test_seeds_resumed_at_different_updates_catch_up(tmp_path):
    """Seed 0 resumes from a lone run stopped at update 20 while seed 1 starts at 0: seed 1
    runs alone to 20, then both together; seed 0's train records are those of a lone run
    that never stopped (seed 1's records: the test above)."""
    config = _config(tmp_path, ["run.total_updates=40"])
    train(seed_config(_config(tmp_path, ["run.total_updates=20"]), 0), tmp_path / "v_seed-0", progress=False)
    summaries = train_seeds(config, {0: tmp_path / "v_seed-0", 1: tmp_path / "v_seed-1"}, resume={0},
                            progress=False)
    assert [(s["status"], s["learner_updates"]) for s in summaries.values()] == [("completed", 40)] * 2

    def losses(path):
        return {r["step"]: r["loss"] for r in read_metrics(path / "metrics.jsonl", "train")}
    train(seed_config(config, 0), tmp_path / "lone_seed-0", progress=False)
    assert losses(tmp_path / "v_seed-0") == losses(tmp_path / "lone_seed-0")
    assert sorted(losses(tmp_path / "v_seed-1")) == [10, 20, 30, 40]


@pytest.mark.slow  # a study: one `eosrl train --seed-runs` child
def test_a_study_runs_an_offline_cells_seeds_as_one_program(tmp_path):
    """`eosrl study --vmap-seeds`: the cell's two seeds run as one child, each in its own run
    directory, finished; run again, the study skips them."""
    import yaml
    from eosrl.launch.study.runner import run_study
    _record(tmp_path / "data")
    study = {"name": "vmapped", "base": str(CONFIGS / "dqn_cartpole.yaml"), "seeds": 2,
             "set": {"regime.mode": "offline", "regime.dataset": str(tmp_path / "data"), "replay.batch_size": 32,
                     "run.total_updates": 20, "run.log_every": 10, "run.checkpoint_every": 10,
                     "run.eval_every": 0, "run.eval_episodes": 1},
             "stages": [{"name": "s", "runs": [{"name": "dqn"}]}]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    lines = []
    result = run_study(tmp_path / "study.yaml", out=tmp_path / "out", echo=lines.append, vmap_seeds=True)
    assert result["counts"] == {"completed": 2}
    assert any("s/dqn_seed-0, s/dqn_seed-1 as one program" in line for line in lines)
    for seed in (0, 1):
        records = list(read_metrics(tmp_path / "out" / "s" / f"dqn_seed-{seed}" / "metrics.jsonl", "train"))
        assert [r["step"] for r in records] == [10, 20]
    assert "one vmapped program" in (tmp_path / "out" / "s" / "dqn_seed-1" / "train.log").read_text()
    again = run_study(tmp_path / "study.yaml", out=tmp_path / "out", echo=lines.append, vmap_seeds=True)
    assert again["counts"] == {"completed": 2} and lines[-2].endswith("min elapsed)") and "skipped" in lines[-2]


@pytest.mark.slow  # offline runs, one of which diverges
def test_a_seed_that_diverges_stops_at_its_update_and_the_others_go_on(tmp_path):
    """At this step size seed 1 diverges (at update 7, measured) and seed 0 does not: seed 1
    stops at the update its lone run names, and seed 0 goes on to the end."""
    config = _config(tmp_path, ["run.total_updates=100", "agent.optimizer.lr=3", "agent.optimizer.name=sgd",
                                "agent.optimizer.momentum=0.0", "run.log_every=50", "run.checkpoint_every=50",
                                "run.eval_every=0"])
    summaries = train_seeds(config, {0: tmp_path / "v_seed-0", 1: tmp_path / "v_seed-1"}, progress=False)
    train(seed_config(config, 1), tmp_path / "lone_seed-1", progress=False)

    def divergence(path):
        return [r["step"] for r in read_metrics(path / "metrics.jsonl", "event") if r["event"] == "divergence"]
    assert [(s["status"], s["learner_updates"]) for s in summaries.values()] == [("completed", 100),
                                                                               ("diverged", 7)]
    assert divergence(tmp_path / "v_seed-1") == divergence(tmp_path / "lone_seed-1") == [7]
    assert [r["step"] for r in read_metrics(tmp_path / "v_seed-0" / "metrics.jsonl", "train")] == [50, 100]


def test_a_seed_batch_of_step_sizes_equals_its_learners_run_alone(tmp_path):
    """SeedBatch over two step sizes and seeds, SGD with momentum: each lr goes to the
    vmapped step as an argument and the optimiser is built from it there (agents/seeds.py);
    each learner's state after 5 + 4 updates (the second 4 run by one member at a time, as
    when the others have diverged), its momentum buffer included, is its lone learner's,
    which closes over its lr as a constant, bit for bit. (So are Adam's, RMSProp's and SGD
    with Nesterov and clipping, and the `lax.scan` path: checked by hand, max |Δ| 0.0.)"""
    extra = ["run.total_updates=9", "agent.optimizer.name=sgd", "agent.optimizer.momentum=0.9"]
    builders = [Builder(seed_config(_config(tmp_path, extra + [f"agent.optimizer.lr={lr}"]), seed))
                for lr, seed in ((0.01, 0), (0.003, 1))]
    data, lone, together = _alone_and_together(builders)
    batch = SeedBatch(together, data)
    batch.run(5)
    batch.run(4, members=[1])  # the member's own lr, not the first's
    batch.run(4, members=[0])
    assert [learner.step for learner in together] == [9, 9]
    _assert_same_states(lone, together)


def test_runs_of_two_step_sizes_as_one_program_equal_their_lone_runs(tmp_path):
    """`eosrl train --seed-runs` (`runs_of_args`, keyed by run directory) of seed 0 at two
    step sizes (once refused: one run.seed) as one program: every record of the second
    (probes with their threshold at its own lr, evaluations) and its final state equal its
    lone run's, bit for bit."""
    extra = ["agent.optimizer.name=sgd", "agent.optimizer.momentum=0.9", "probe.enabled=true", "probe.every=20",
             "probe.num_eigs=1", "probe.batch_size=32", "run.total_updates=40"]
    configs = {f"lr-{lr}": _config(tmp_path, extra + [f"agent.optimizer.lr={lr}"]) for lr in (0.01, 0.003)}
    for name, config in configs.items():
        (tmp_path / name).mkdir()
        save_config(config, tmp_path / name / "config.yaml")
    args = argparse.Namespace(seed_runs=[str(tmp_path / name) for name in configs], config=None, seeds=None,
                              run_dir=None, overwrite=False)
    loaded, runs, resume = runs_of_args(args, load_config, lambda path: None)
    assert list(runs) == [tmp_path / name for name in configs] and not resume
    summaries = train_seeds(loaded, runs, resume, progress=False)
    assert [(s["status"], s["learner_updates"]) for s in summaries.values()] == [("completed", 40)] * 2
    train(configs["lr-0.003"], tmp_path / "lone", progress=False)
    _same(_run_records(tmp_path / "lr-0.003"), _run_records(tmp_path / "lone"))
    thresholds = [[r["threshold"] for r in read_metrics(tmp_path / name / "metrics.jsonl", "probe")]
                  for name in configs]
    np.testing.assert_allclose(thresholds[0], [3.8 / 0.01] * 2, rtol=1e-6)  # (2 + 2β)/η at each run's own η
    np.testing.assert_allclose(thresholds[1], [3.8 / 0.003] * 2, rtol=1e-6)


def test_a_study_runs_a_grid_over_lr_as_one_program_but_not_under_a_step_size_rule(tmp_path):
    """`--vmap-seeds` (`seed_cells`) takes an offline stage's grid over agent.optimizer.lr with
    two seeds as one job; under a step-size rule, which sets each step from lr, one job per
    lr (its seeds), and `check_together` and `SeedBatch` refuse different lrs, naming the field."""
    import yaml
    from eosrl.launch.study.runner import seed_cells
    from eosrl.launch.study.spec import load_study, plan_study
    _record(tmp_path / "data")
    rule = {"agent.optimizer.name": "sgd", "agent.optimizer.step_size_rule": "corridor"}
    study = {"name": "lrs", "base": str(CONFIGS / "dqn_cartpole.yaml"), "seeds": 2,
             "set": {"regime.mode": "offline", "regime.dataset": str(tmp_path / "data"), "run.total_updates": 20},
             "stages": [{"name": "plain", "grid": {"agent.optimizer.lr": [0.01, 0.003]}},
                        {"name": "rule", "set": rule, "grid": {"agent.optimizer.lr": [0.01, 0.003]}}]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    specs = plan_study(load_study(tmp_path / "study.yaml"), tmp_path / "study.yaml", tmp_path / "out")

    def jobs(stage):
        return [[(s.config.agent.optimizer.lr, s.seed) for s in job] for job in
                seed_cells([s for s in specs if s.stage == stage])]
    assert jobs("plain") == [[(0.01, 0), (0.01, 1), (0.003, 0), (0.003, 1)]]
    assert jobs("rule") == [[(0.01, 0), (0.01, 1)], [(0.003, 0), (0.003, 1)]]
    ruled = {s.key: s.config for s in specs if s.stage == "rule" and s.seed == 0}
    with pytest.raises(ValueError, match="agent.optimizer.lr differs .*step_size_rule corridor"):
        check_together(ruled)
    learners = [Builder(config).make_learner() for config in ruled.values()]
    with pytest.raises(ValueError, match="agent.optimizer.lr: 0.01, 0.003 under agent.optimizer.step_size_rule"):
        SeedBatch(learners, offline.load(Builder(next(iter(ruled.values()))))[0])
    # The dry run shows each program's one command, not its runs' own.
    from eosrl.launch.study.runner import run_study
    lines: list = []
    run_study(tmp_path / "study.yaml", out=tmp_path / "out", dry_run=True, echo=lines.append, vmap_seeds=True)
    commands = [line for line in lines if line.lstrip().startswith("cmd")]
    run_dirs = [[word for word in line.split("--seed-runs")[1].split() if not word.startswith("--")]
                for line in commands]
    assert [len(dirs) for dirs in run_dirs] == [4, 2, 2]  # the lr grid's 4 runs; each rule lr's 2 seeds
