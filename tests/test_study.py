"""Tests of `eosrl study` (launch.study): grid expansion and run names, seeds,
substitution, planning, skipping finished runs, the runner's handling of failed and
diverged runs (with stand-in commands instead of training), the report and its
across-seed numbers from hand-written run dirs, and the small MinAtar step-size sweep
end to end."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from eosrl.launch.config import parse_overrides
from conftest import CONFIGS
from eosrl.launch import study as st
from eosrl.launch import supervisor

CARTPOLE = str(CONFIGS / "dqn_cartpole.yaml")


def write_study(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def plan(tmp_path: Path, data: dict, validate: bool = True):
    path = write_study(tmp_path, data)
    return st.plan_study(st.load_study(path), path, tmp_path / "out", validate=validate)


def write_metrics(run_dir: Path, records) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def probe(step, ratio):
    sharpness = "nan" if ratio == "nan" else 450.0 * ratio  # the writer stores NaN as "nan"
    return {"kind": "probe", "step": step, "sharpness": sharpness, "threshold": 450.0,
            "sharpness_over_threshold": ratio}


def finished(step, status, final=None, wall=12.0):
    return {"kind": "event", "step": step, "event": "finished", "status": status,
            "final_eval_return": final, "wall_seconds": wall, "learner_updates": step}


TWO_STAGES = {
    "name": "toy",
    "base": CARTPOLE,
    "set": {"run.eval_episodes": 2, "replay": {"min_size": 500}},
    "stages": [
        {"name": "record", "runs": [{"name": "collect", "set": {"replay.record_to": "{run_dir}/dataset",
                                                                 "run.total_env_steps": 1000}}]},
        {"name": "regimes", "set": {"probe.enabled": True, "run.total_env_steps": 2000},
         "grid": {"agent.kind": ["dqn", "c51"],
                  "regime": [{"label": "online", "mode": "online"},
                             {"label": "offline-first", "mode": "offline", "subset": "first 500",
                              "dataset": "{run:collect}/dataset", "run.total_updates": 300}]}},
    ],
}


# ----------------------------------------------------------------------------
# Pure functions.


def test_grid_expands_to_the_cartesian_product_with_readable_names():
    points = st.expand_grid({
        "agent.kind": ["dqn", "c51"],
        "agent.optimizer.lr": [0.001, 0.01],
        "regime": [{"label": "offline first/5k", "mode": "offline", "subset": "first 5000",
                    "run.total_updates": 100}],
    })
    assert [p[0] for p in points] == ["dqn_lr-0.001_offline-first-5k", "dqn_lr-0.01_offline-first-5k",
                                      "c51_lr-0.001_offline-first-5k", "c51_lr-0.01_offline-first-5k"]
    name, values, overrides = points[1]
    assert values == {"agent.kind": "dqn", "agent.optimizer.lr": "0.01", "regime": "offline first/5k"}
    # Dotless keys live inside the axis, dotted keys are full config keys.
    assert overrides == {"agent.kind": "dqn", "agent.optimizer.lr": 0.01, "regime.mode": "offline",
                         "regime.subset": "first 5000", "run.total_updates": 100}


def test_numbers_and_booleans_are_named_by_their_key():
    points = st.expand_grid({"run.seed": [0, 1], "agent.double_q": [True]})
    assert [p[0] for p in points] == ["seed-0_double_q-true", "seed-1_double_q-true"]


@pytest.mark.parametrize("grid,message", [
    ({"regime": [{"mode": "offline"}]}, "label"),
    ({"agent.kind": []}, "non-empty list"),
    ({"x": [{"label": "a b"}, {"label": "a/b"}]}, "same name part"),
])
def test_bad_grids_are_refused(grid, message):
    with pytest.raises(st.StudyError, match=message):
        st.expand_grid(grid)


def test_safe_name():
    assert st.safe_name("first 5000 / lr=1e-4") == "first-5000-lr-1e-4"
    assert st.safe_name("../..") == "run"


def test_flatten_accepts_nested_and_dotted_keys():
    assert st.flatten({"agent": {"optimizer": {"lr": 1}}, "run.seed": 2}) == \
        {"agent.optimizer.lr": 1, "run.seed": 2}


@pytest.mark.parametrize("value", ["first 5000", "true", "", "1e-4", "/a b/c: d", 0.008, 3, True, [64, 64]])
def test_override_values_survive_the_command_line(value):
    (key, parsed), = parse_overrides([f"k={st.yaml_value(value)}"])
    assert parsed == value


def test_substitution():
    context = {"study_dir": "/s", "run_dir": "/s/b/r", "run:record/collect": "/s/record/collect",
               "key:run:record/collect": "record/collect", "run:collect": "/s/record/collect",
               "key:run:collect": "record/collect", "run:twice": None}
    value, deps = st.substitute("{run:collect}/dataset", context)
    assert value == "/s/record/collect/dataset" and deps == ["record/collect"]
    assert st.substitute("{study_dir}/x {run_dir} {other} {", context) == ("/s/x /s/b/r {other} {", [])
    assert st.substitute(["{run:record/collect}", 3], context) == (["/s/record/collect", 3], ["record/collect"])
    assert st.substitute(5, context) == (5, [])
    with pytest.raises(st.StudyError, match="names no run of an earlier stage.*record/collect"):
        st.substitute("{run:nope}", context)
    with pytest.raises(st.StudyError, match="ambiguous"):
        st.substitute("{run:twice}", context)


# ----------------------------------------------------------------------------
# Planning.


def test_plan_resolves_dirs_overrides_and_dependencies(tmp_path):
    specs = plan(tmp_path, TWO_STAGES)
    out = (tmp_path / "out").resolve()
    assert [s.key for s in specs] == ["record/collect", "regimes/dqn_online", "regimes/dqn_offline-first",
                                      "regimes/c51_online", "regimes/c51_offline-first"]
    collect, offline = specs[0], specs[2]
    assert collect.run_dir == out / "record" / "collect"
    assert collect.overrides["replay.record_to"] == str(out / "record" / "collect" / "dataset")
    assert offline.overrides["regime.dataset"] == str(out / "record" / "collect" / "dataset")
    assert offline.deps == ["record/collect"] and specs[1].deps == []
    # study set < stage set < grid values; each config is built as `eosrl train` will build it.
    assert offline.config.replay.min_size == 500 and offline.config.probe.enabled
    assert offline.config.regime.subset == "first 500" and offline.config.run.total_updates == 300
    assert specs[3].config.agent.kind == "c51" and collect.config.probe.enabled is False
    args = offline.train_args()
    assert args[:2] == ["train", CARTPOLE] and "--no-progress" in args
    assert "regime.subset=first 500" in args


def test_plan_refuses_bad_keys_and_references(tmp_path):
    bad_key = {**TWO_STAGES, "set": {"run.eval_episodse": 2}}
    with pytest.raises(st.StudyError, match="record/collect.*eval_episodse"):
        plan(tmp_path, bad_key)
    same_stage = {"name": "x", "base": CARTPOLE, "stages": [
        {"name": "a", "runs": [{"name": "one"}, {"name": "two", "set": {"replay.record_to": "{run:one}/d"}}]}]}
    with pytest.raises(st.StudyError, match=r"\{run:one\} names no run of an earlier stage"):
        plan(tmp_path, same_stage)
    both = {"name": "x", "base": CARTPOLE,
            "stages": [{"name": "a", "runs": [{"name": "r"}], "grid": {"run.seed": [1]}}]}
    with pytest.raises(st.StudyError, match="either 'runs' or 'grid'"):
        plan(tmp_path, both)
    with pytest.raises(st.StudyError, match="base: nowhere.yaml not found"):
        plan(tmp_path, {"name": "x", "base": "nowhere.yaml", "stages": [{"name": "a", "runs": [{"name": "r"}]}]})
    with pytest.raises(st.StudyError, match="unknown key 'grids'"):
        plan(tmp_path, {"name": "x", "base": CARTPOLE, "stages": [{"name": "a", "grids": {}}]})


def test_study_file_empty_or_with_a_duplicate_key_is_refused(tmp_path):
    """The study file is read like a config: blank, or a key given twice (YAML keeps the last), stops it."""
    path = tmp_path / "study.yaml"
    path.write_text("# to do\n")
    with pytest.raises(st.StudyError, match="the study file is empty"):
        st.load_study(path)
    path.write_text(f"name: x\nbase: {CARTPOLE}\nstages:\n  - name: a\n    runs:\n"
                    f"      - {{name: r, set: {{run.seed: 1, run.seed: 2}}}}\n")
    key = re.escape("stages[0].runs[0].set.run.seed")
    with pytest.raises(st.StudyError, match=rf"duplicate key '{key}' on lines 6 and 6"):
        st.load_study(path)


SEEDED = {
    "name": "seeded", "base": CARTPOLE, "seeds": 2,
    "stages": [
        {"name": "record", "runs": [{"name": "collect", "set": {"replay.record_to": "{run_dir}/dataset"}}]},
        {"name": "regimes", "grid": {"agent.kind": ["dqn", "c51"],
                                     "regime": [{"label": "offline", "mode": "offline",
                                                 "dataset": "{run:collect}/dataset", "run.total_updates": 300}]}},
    ],
}


def test_seeds_copy_every_run_and_each_seed_reads_its_own_dataset(tmp_path):
    specs = plan(tmp_path, SEEDED)
    out = (tmp_path / "out").resolve()
    assert [s.key for s in specs] == [
        "record/collect_seed-0", "record/collect_seed-1",
        "regimes/dqn_offline_seed-0", "regimes/dqn_offline_seed-1",
        "regimes/c51_offline_seed-0", "regimes/c51_offline_seed-1"]
    assert [s.seed for s in specs] == [0, 1] * 3 and [s.config.run.seed for s in specs] == [0, 1] * 3
    assert [s.group for s in specs] == ["collect"] * 2 + ["dqn_offline"] * 2 + ["c51_offline"] * 2
    assert specs[3].values == {"agent.kind": "dqn", "regime": "offline", "run.seed": "1"}
    # The rule: a run with seeds named without its seed is its copy with the same seed.
    for spec in specs[2:]:
        assert spec.overrides["regime.dataset"] == str(out / "record" / f"collect_seed-{spec.seed}" / "dataset")
        assert spec.deps == [f"record/collect_seed-{spec.seed}"]
    assert specs[1].overrides["replay.record_to"] == str(out / "record" / "collect_seed-1" / "dataset")


def test_seeds_per_stage_shared_dataset_and_explicit_copies(tmp_path):
    # A stage's seeds replace the study's; `seeds: null` runs a stage once: then every seed
    # of a later stage reads that one run.
    shared = {**SEEDED, "seeds": [3, 7], "stages": [{**SEEDED["stages"][0], "seeds": None}, SEEDED["stages"][1]]}
    specs = plan(tmp_path, shared)
    assert [s.name for s in specs[:3]] == ["collect", "dqn_offline_seed-3", "dqn_offline_seed-7"]
    assert specs[0].seed is None and specs[0].group == "collect"
    assert {s.overrides["regime.dataset"] for s in specs[1:]} == {str((tmp_path / "out" / "record" / "collect" / "dataset").resolve())}
    # One copy can always be named in full, e.g. from a stage without seeds.
    one = {**SEEDED, "seeds": None, "stages": [
        {**SEEDED["stages"][0], "seeds": [0, 1]},
        {"name": "b", "runs": [{"name": "r", "set": {"regime.mode": "offline", "run.total_updates": 10,
                                                     "regime.dataset": "{run:collect_seed-1}/dataset"}}]}]}
    r = plan(tmp_path, one)[-1]
    assert r.key == "b/r" and r.deps == ["record/collect_seed-1"] and r.seed is None


@pytest.mark.parametrize("change,message", [
    # A stage without seeds cannot pick a copy for itself.
    ({"stages": [{**SEEDED["stages"][0], "seeds": 2}, {**SEEDED["stages"][1], "seeds": None}]},
     r"\{run:collect\} names a run with seeds 0, 1 .*this run has no seed, so name one copy, e\.g\. \{run:collect_seed-0\}"),
    # A seed the recording does not have.
    ({"stages": [{**SEEDED["stages"][0], "seeds": [0, 1]}, {**SEEDED["stages"][1], "seeds": 3}]},
     r"stages\[1\] run dqn_offline_seed-2: regime.dataset: \{run:collect\} names a run with seeds 0, 1 .*"
     r"seed 2 is not one of them"),
    ({"seeds": 2, "set": {"run.seed": 5}}, r"run collect gets its seed from both 'seeds' and 'run.seed'"),
])
def test_seed_references_that_cannot_resolve_are_refused(tmp_path, change, message):
    with pytest.raises(st.StudyError, match=message):
        plan(tmp_path, {**SEEDED, **change})


@pytest.mark.parametrize("seeds", [0, -1, [], [1, 1], [True], "3", 1.5, [0, -2], True])
def test_bad_seeds_are_refused_with_what_is_valid(tmp_path, seeds):
    with pytest.raises(st.StudyError, match=r"seeds: expected a count N >= 1 \(seeds 0..N-1\) or a non-empty "
                                            r"list of distinct integers >= 0, got"):
        st.load_study(write_study(tmp_path, {**SEEDED, "seeds": seeds}))
    stage = {**SEEDED, "seeds": None, "stages": [{**SEEDED["stages"][0], "seeds": seeds}]}
    with pytest.raises(st.StudyError, match=r"stages\[0\]\.seeds: expected a count N >= 1"):
        plan(tmp_path, stage)


def test_a_run_seed_grid_axis_groups_like_seeds(tmp_path):
    specs = plan(tmp_path, {"name": "x", "base": CARTPOLE, "stages": [
        {"name": "a", "grid": {"agent.kind": ["dqn"], "run.seed": [4, 5], "agent.double_q": [True]}}]})
    assert [(s.name, s.group, s.seed) for s in specs] == [("dqn_seed-4_double_q-true", "dqn_double_q-true", 4),
                                                          ("dqn_seed-5_double_q-true", "dqn_double_q-true", 5)]


@pytest.mark.parametrize("path", sorted((CONFIGS / "studies").glob("*.yaml")), ids=lambda p: p.name)
@pytest.mark.slow
def test_shipped_studies_plan(path, tmp_path):
    specs = st.plan_study(st.load_study(path), path, tmp_path)
    if path.name == "c51_sn_adam_minatar.yaml":  # online C51 under Adam, with and without SN(-2)
        assert {(s.config.agent.spectral_norm.layers, s.seed) for s in specs} == \
            {(layers, seed) for layers in ("none", "-2") for seed in (0, 1, 2)}
        assert all((s.config.agent.kind, s.config.agent.optimizer.name) == ("c51", "adam") for s in specs)
        return
    assert specs[0].config.replay.record_to.startswith(str(tmp_path))
    if path.name == "stability_controls_minatar.yaml":  # DQN and C51 × 5 controls × 3 seeds, offline
        controls = [s for s in specs if s.stage == "controls"]
        assert len(specs) == 3 + len(controls) and len(controls) == 2 * 5 * 3
        rules = {(s.config.agent.optimizer.step_size_rule, s.config.agent.gradient_penalty > 0,
                  s.config.agent.geometric_complexity_penalty > 0) for s in controls}
        assert len(rules) == 5 and all(s.config.agent.optimizer.lr == 0.256 for s in controls)
        assert all(s.deps == [f"record/collect_seed-{s.seed}"] for s in controls)
        return
    if path.name == "iordan2023_minatar.yaml":  # the paper's setting: headline and controls
        headline = [s for s in specs if s.stage == "headline"]
        controls = [s for s in specs if s.stage == "controls"]
        assert len(specs) == 3 + len(headline) + len(controls) and (len(headline), len(controls)) == (12, 15)
        for s in headline:
            c = s.config
            assert (c.agent.optimizer.name, c.agent.optimizer.lr, c.agent.optimizer.momentum,
                    c.replay.batch_size, c.probe.every, c.probe.num_eigs, c.probe.batch_size) == \
                ("sgd", 0.008, 0.8, 512, 100, 5, 512)
            updates = (c.run.total_updates if c.regime.mode == "offline"
                       else (c.run.total_env_steps - c.replay.min_size) // c.replay.update_period)
            assert updates >= 100_000
        assert {s.config.agent.kind for s in controls} == {"dqn", "qrdqn", "c51"}
        assert all(s.config.run.total_updates >= 20_000 and s.deps == [f"record/collect_seed-{s.seed}"]
                   for s in controls)
        effective = {s.name.split("_seed")[0]: s.config.agent.optimizer.lr / (1 - s.config.agent.optimizer.momentum)
                     for s in controls}
        assert all(abs(step - 0.16) < 1e-9 for step in effective.values())  # one effective step η/(1−β)
        return
    if path.name.startswith("eos_regimes"):  # DQN and C51 in six regimes, 3 seeds (the small one: 1)
        regimes = [s for s in specs if s.stage == "regimes"]
        seeds = [0, 1, 2] if path.name == "eos_regimes_minatar.yaml" else [None]
        assert len(regimes) == 12 * len(seeds) and {s.seed for s in regimes} == set(seeds)
        assert {s.config.regime.mode for s in regimes} == {"online", "offline", "offline_to_online"}
        for s in regimes:
            collect = "record/collect" if s.seed is None else f"record/collect_seed-{s.seed}"
            assert s.deps == ([] if s.config.regime.mode == "online" else [collect])
        if seeds != [None]:
            assert all(s.config.agent.optimizer.lr == 0.256 for s in regimes)
        return
    # The step-size sweeps: DQN and C51 × step sizes × regimes × seeds, SGD with heavy-ball
    # momentum 0.8, probes on; offline seed s reads the dataset recorded with seed s.
    full = path.name == "eos_lr_sweep_minatar.yaml"
    seeds, lrs, modes = (([0, 1, 2], [0.008, 0.016, 0.032, 0.064, 0.128, 0.256], ("offline", "online")) if full
                         else ([0, 1], [0.016, 0.064], ("offline",)))
    sweep = [s for s in specs if s.stage == "sweep"]
    assert len(specs) == len(seeds) + len(sweep) and len(sweep) == 2 * len(lrs) * len(modes) * len(seeds)
    assert {(s.config.agent.kind, s.config.agent.optimizer.lr, s.config.regime.mode, s.seed) for s in sweep} == \
        {(k, lr, m, seed) for k in ("dqn", "c51") for lr in lrs for m in modes for seed in seeds}
    for s in sweep:
        opt = s.config.agent.optimizer
        assert (opt.name, opt.momentum, opt.nesterov, s.config.probe.enabled, s.config.run.seed) == \
            ("sgd", 0.8, False, True, s.seed)
        assert s.deps == ([f"record/collect_seed-{s.seed}"] if s.config.regime.mode == "offline" else [])


# ----------------------------------------------------------------------------
# Skipping and running (stand-in commands instead of training).


def test_finished_runs_are_recognised(tmp_path):
    write_metrics(tmp_path / "done", [{"kind": "train", "step": 5}, finished(5, "completed")])
    write_metrics(tmp_path / "nan", [{"kind": "event", "step": 3, "event": "divergence"}, finished(3, "diverged")])
    write_metrics(tmp_path / "stopped", [finished(4, "interrupted")])
    write_metrics(tmp_path / "resumed", [finished(4, "completed"), {"kind": "event", "step": 4, "event": "resumed"}])
    write_metrics(tmp_path / "running", [{"kind": "train", "step": 5}])
    assert [st.is_finished(tmp_path / n) for n in ("done", "nan", "stopped", "resumed", "running", "absent")] == \
        [True, True, False, False, False, False]
    assert st.finished_status(tmp_path / "stopped") == "interrupted"


FAKE_TRAIN = """
import json, sys, pathlib
run_dir, behaviour = pathlib.Path(sys.argv[1]), sys.argv[2]
def write(*records):
    with open(run_dir / "metrics.jsonl", "a") as f:
        for r in records: f.write(json.dumps(r) + "\\n")
if behaviour == "crash":
    print("Traceback: boom", file=sys.stderr); sys.exit(3)
write({"kind": "probe", "step": 100, "sharpness": 900.0, "threshold": 450.0, "sharpness_over_threshold": 2.0})
if behaviour == "diverge":
    write({"kind": "event", "step": 150, "event": "divergence"},
          {"kind": "event", "step": 150, "event": "finished", "status": "diverged", "wall_seconds": 1.0})
    sys.exit(1)
write({"kind": "event", "step": 200, "event": "finished", "status": "completed",
       "final_eval_return": 7.5, "wall_seconds": 2.0})
"""


@pytest.fixture
def fake_train(monkeypatch):
    """Runs stand in for `eosrl train`: the run named `crash` fails, `nan*` diverges."""
    def command(child):  # a run's Child is named by its key and logs to RUN_DIR/train.log
        name = child.name.split("/")[-1]
        behaviour = "crash" if name == "crash" else "diverge" if name.startswith("nan") else "ok"
        return [sys.executable, "-c", FAKE_TRAIN, str(child.log.parent), behaviour]
    monkeypatch.setattr(supervisor.Child, "command", property(command))


FAKE_STUDY = {"name": "fake", "base": CARTPOLE, "stages": [
    {"name": "a", "runs": [{"name": "ok"}, {"name": "crash"}, {"name": "nan"}, {"name": "done"}]},
    {"name": "b", "runs": [{"name": "after-ok", "set": {"replay.record_to": "{run:ok}/d"}},
                           {"name": "after-crash", "set": {"replay.record_to": "{run:crash}/d"}},
                           {"name": "after-nan", "set": {"replay.record_to": "{run:nan}/d"}}]},
]}


@pytest.mark.slow
def test_runner_skips_finished_reports_failures_and_carries_on(tmp_path, fake_train):
    path = write_study(tmp_path, FAKE_STUDY)
    out = tmp_path / "out"
    write_metrics(out / "a" / "done", [finished(10, "completed", final=1.0)])
    lines = []
    result = st.run_study(path, parallel=2, out=out, echo=lines.append)
    text = "\n".join(lines)
    assert "a/done: skipped, already finished (completed)" in text
    assert "a/crash: FAILED (exit code 3)" in text and str(out / "a" / "crash" / "train.log") in text
    assert "a/nan: diverged" in text and "at update 150" in text
    assert "b/after-crash: blocked: needs a/crash" in text
    assert sum(line.startswith("[") and "/7]" in line for line in lines) == 7  # progress of every run
    assert "boom" in (out / "a" / "crash" / "train.log").read_text()
    statuses = {(r["stage"], r["run"]): r["status"] for r in result["rows"]}
    assert statuses == {("a", "ok"): "completed", ("a", "crash"): "failed", ("a", "nan"): "diverged",
                        ("a", "done"): "completed", ("b", "after-ok"): "completed",
                        ("b", "after-crash"): "blocked", ("b", "after-nan"): "completed"}
    assert not (out / "a" / "done" / "train.log").exists()  # a skipped run is not touched

    # Again: finished runs are skipped, the failed one starts over (from a clean dir).
    (out / "a" / "crash" / "stale").write_text("left by the failed attempt")
    lines.clear()
    st.run_study(path, out=out, echo=lines.append)
    assert sum("skipped" in line for line in lines) == 5
    assert not (out / "a" / "crash" / "stale").exists()


@pytest.mark.slow
def test_unfinished_run_resumes_from_its_checkpoint(tmp_path):
    from eosrl.launch.config import save_config
    from eosrl.launch.rundir import read_metrics
    from eosrl.launch.train import train
    path = write_study(tmp_path, {"name": "resume", "base": CARTPOLE, "stages": [{"name": "s", "runs": [
        {"name": "r", "set": {"run": {"total_env_steps": 800, "eval_every": 0, "eval_episodes": 1},
                              "replay": {"min_size": 200, "checkpoint": False}}}]}]})
    out = tmp_path / "out"
    spec = st.plan_study(st.load_study(path), path, out)[0]
    # What a crash after the checkpoint at 400 of 800 env steps leaves: the run's
    # config.yaml, its checkpoint, and metrics without a `finished` event.
    half = dataclasses.replace(spec.config, run=dataclasses.replace(spec.config.run, total_env_steps=400))
    train(half, spec.run_dir, progress=False)
    save_config(spec.config, spec.run_dir / "config.yaml")
    records = (spec.run_dir / "metrics.jsonl").read_text().splitlines()
    (spec.run_dir / "metrics.jsonl").write_text("\n".join(r for r in records if '"finished"' not in r) + "\n")
    (spec.run_dir / "train.log").write_text("the first attempt\n")
    edited = dataclasses.replace(spec, config=dataclasses.replace(
        spec.config, run=dataclasses.replace(spec.config.run, seed=7)))
    assert st.resumable(spec) and not st.resumable(edited)  # an edited study starts the run over

    lines = []
    result = st.run_study(path, out=out, echo=lines.append)
    assert any(line.startswith("  resumed s/r") for line in lines)
    assert any("completed" in line and "(resumed from its checkpoint)" in line for line in lines)
    assert result["rows"][0]["status"] == "completed"
    events = list(read_metrics(spec.run_dir / "metrics.jsonl", "event"))
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["env_steps"] == 400
    assert events[-1]["event"] == "finished" and events[-1]["env_steps"] == 800
    assert (spec.run_dir / "train.log").read_text().startswith("the first attempt\n")  # appended to


def test_dry_run_runs_nothing(tmp_path, fake_train, capsys):
    path = write_study(tmp_path, FAKE_STUDY)
    lines = []
    result = st.run_study(path, out=tmp_path / "out", dry_run=True, echo=lines.append)
    assert result["report"] is None and not (tmp_path / "out").exists()
    assert lines[0].startswith("[1/7] a/ok  (to run)")
    assert any("cmd" in line for line in lines)


def test_only_runs_the_selected_runs_and_reports_the_rest(tmp_path, fake_train):
    """A long study in parts: `--only` patterns pick runs by key; a dependency finished in an
    earlier part counts as finished; what was left out is "not run" in the report."""
    path = write_study(tmp_path, FAKE_STUDY)
    out = tmp_path / "out"
    write_metrics(out / "a" / "ok", [finished(10, "completed", final=1.0)])  # an earlier part
    lines = []
    result = st.run_study(path, out=out, echo=lines.append, only=["b/after-ok", "a/d*"])
    assert "2 of 7 selected by --only" in lines[0]
    statuses = {f"{r['stage']}/{r['run']}": r["status"] for r in result["rows"]}
    assert statuses["b/after-ok"] == "completed" and statuses["a/done"] == "completed"
    assert statuses["a/crash"] == "not run" and statuses["b/after-nan"] == "not run"
    assert not (out / "a" / "crash").exists()
    with pytest.raises(st.StudyError, match="--only: x/\\* matches none of the study's runs"):
        st.run_study(path, out=out, echo=lines.append, only=["x/*"])


def test_study_parser():
    parser = argparse.ArgumentParser(prog="eosrl")
    st.add_study_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["study", "s.yaml", "--parallel", "3", "--out", "o", "--dry-run",
                              "--only", "a/*", "--only", "*_seed-0"])
    assert (args.study, args.parallel, args.out, args.dry_run, args.func) == ("s.yaml", 3, "o", True, st.cmd_study)
    assert args.only == ["a/*", "*_seed-0"]
    assert parser.parse_args(["study", "s.yaml"]).parallel == 1
    with pytest.raises(st.StudyError, match="--parallel"):
        st.cmd_study(argparse.Namespace(study="s.yaml", parallel=0, out=None, dry_run=False, only=None))


# ----------------------------------------------------------------------------
# The report from hand-written run dirs.


def test_report_from_synthetic_run_dirs(tmp_path):
    path = write_study(tmp_path, TWO_STAGES)
    specs = st.plan_study(st.load_study(path), path, tmp_path / "out")
    by_key = {s.key: s for s in specs}
    write_metrics(by_key["record/collect"].run_dir,
                  [{"kind": "eval", "step": 900, "return_mean": 20.0}, finished(900, "completed", final=25.0)])
    write_metrics(by_key["regimes/dqn_online"].run_dir,
                  [probe(100, 0.5), probe(200, 1.2), probe(300, 1.5), probe(400, 0.9), probe(500, 1.01),
                   finished(500, "completed", final=30.0, wall=61.0)])
    write_metrics(by_key["regimes/c51_online"].run_dir,
                  [probe(100, 0.1), probe(200, 0.2), finished(200, "completed", final=40.0)])
    write_metrics(by_key["regimes/dqn_offline-first"].run_dir,
                  [probe(100, 0.8), probe(200, "nan"),
                   {"kind": "eval", "step": 100, "return_mean": 3.0},
                   {"kind": "event", "step": 230, "event": "divergence", "reason": "non-finite loss"},
                   finished(230, "diverged")])
    # regimes/c51_offline-first never got to write metrics (it failed at start-up).
    results = {"regimes/c51_offline-first": st.RunResult(by_key["regimes/c51_offline-first"], "failed",
                                                         returncode=2, seconds=3.0)}
    report = st.write_report(st.load_study(path), path, tmp_path / "out", specs, results)
    text = report.read_text()
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| record") or line.startswith("| regimes")}
    assert len(rows) == len(specs)
    dqn = rows["[dqn_online](regimes/dqn_online)"]
    assert dqn[2] == "agent.kind=dqn, regime=online" and dqn[3] == "completed"
    assert dqn[4:] == ["30.00", "675.000", "0.60 (3/5)", "–", "61"]
    diverged = rows["[dqn_offline-first](regimes/dqn_offline-first)"]
    assert diverged[3] == "diverged" and diverged[4] == "3.00" and diverged[6] == "0.00 (0/2)" and diverged[7] == "230"
    failed = rows["[c51_offline-first](regimes/c51_offline-first)"]
    assert failed[3] == "failed" and failed[8] == "3"
    assert "regimes/c51_offline-first/train.log" in text  # the failed run's log is named
    assert rows["[collect](record/collect)"][4] == "25.00"
    for png in ("sharpness_over_threshold.png", "final_returns.png"):
        assert f"](plots/{png})" in text
        assert (tmp_path / "out" / "plots" / png).stat().st_size > 5_000


def test_report_without_probes_or_returns_says_so(tmp_path):
    path = write_study(tmp_path, {"name": "x", "base": CARTPOLE, "stages": [{"name": "a", "runs": [{"name": "r"}]}]})
    specs = st.plan_study(st.load_study(path), path, tmp_path / "out")
    text = st.write_report(st.load_study(path), path, tmp_path / "out", specs, {}).read_text()
    assert "| a | [r](a/r) | – | not run |" in text
    assert text.count("no data to plot") == 2
    assert "Every group has one run, so there is nothing to aggregate" in text


# ----------------------------------------------------------------------------
# Across seeds: 2 groups × 3 seeds of hand-written run dirs, checked against numbers
# worked out by hand. Threshold 400, so λ₁ 360 and 440 are exactly 0.9 and 1.1 of it.


def probes(*sharpness, batch=None):
    """Probe records every 100 updates, as the prober writes them (NaN as "nan")."""
    out = []
    for i, value in enumerate(sharpness):
        r = {"kind": "probe", "step": 100 * (i + 1), "sharpness": value, "threshold": 400.0,
             "eigenvalues": [value], "sharpness_over_threshold": value if value == "nan" else value / 400.0}
        if batch is not None:
            r["batch_sharpness"] = batch[i]
        out.append(r)
    return out


def ended(step, status, final=None):
    return [{"kind": "event", "step": step, "event": "learner_finished", "status": status},
            finished(step, status, final=final)]


SEED_RUNS = {
    # dqn: λ₁/threshold 0.5 0.95 1.05 1.2 0.8 | 0.3 0.6 0.92 1.0 1.08 | 0.2 0.4 0.5 0.6 0.7.
    # batch_sharpness = the threshold at every probe of every seed.
    "dqn_seed-0": probes(200, 380, 420, 480, 320, batch=[400] * 5) + ended(500, "completed", 10.0),
    "dqn_seed-1": probes(120, 240, 368, 400, 432, batch=[400] * 5) + ended(500, "completed", 16.0),
    "dqn_seed-2": probes(80, 160, 200, 240, 280, batch=[400] * 5) + ended(500, "completed", 4.0),
    # c51: seed 0 diverges after 2 probes (its last periodic evaluation, 2.0, is its return);
    # seed 1: 0.9 1.1 1.2 (the band's edges count as inside); seed 2: 0.5 0.95 0.5.
    "c51_seed-0": probes(40, 80, "nan") + [{"kind": "eval", "step": 100, "return_mean": 1.0},
                                           {"kind": "eval", "step": 200, "return_mean": 2.0},
                                           {"kind": "event", "step": 250, "event": "divergence"}]
    + ended(250, "diverged"),
    "c51_seed-1": probes(360, 440, 480) + ended(300, "completed", 7.0),
    "c51_seed-2": probes(200, 380, 200) + ended(300, "completed", 3.0),
}


def table_rows(text: str, heading: str):
    """{group: cells} of the table under the markdown heading `heading`."""
    lines = text.split(f"### {heading}\n", 1)[1].strip("\n").split("\n\n", 1)[0].splitlines()
    return {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in lines[2:]}


def test_across_seed_numbers_match_hand_computed_ones(tmp_path):
    path = write_study(tmp_path, {"name": "seeds", "base": CARTPOLE, "seeds": 3,
                                  "stages": [{"name": "s", "grid": {"agent.kind": ["dqn", "c51"]}}]})
    specs = st.plan_study(st.load_study(path), path, tmp_path / "out")
    for spec in specs:
        write_metrics(spec.run_dir, SEED_RUNS[spec.name])
    text = st.write_report(st.load_study(path), path, tmp_path / "out", specs, {}).read_text()

    # Final return. IQM of 3 values cuts int(0.75) = 0 from each end: the mean. The 95 %
    # interval of 3 seeds is their range: a resample of only the lowest (highest) seed has
    # probability 1/27 = 3.7 % > 2.5 %, so with 2000 resamples (bootstrap seed 0) both
    # percentiles fall on such resamples.
    returns = table_rows(text, "Final evaluation return")
    assert returns["dqn"][3:] == ["3/3", "10.00 [4.00, 16.00]", "s0 10.00, s1 16.00, s2 4.00"]  # (10+16+4)/3
    assert returns["c51"][3:] == ["3/3", "4.00 [2.00, 7.00]", "s0 2.00 (div.), s1 7.00, s2 3.00"]  # (2+7+3)/3

    sharp = table_rows(text, "λ₁ relative to the stability threshold")
    # dqn. Reached (≥ 0.9): 3/5, 3/5, 0/5 -> IQM 0.4 in [0, 0.6].
    # At the edge (0.9-1.1): 0.95 1.05 -> 2/5; 0.92 1.0 1.08 -> 3/5; none -> 0 -> IQM 1/3 in [0, 0.6].
    # First probe ≥ 0.9: 200, 300, never -> median 300. Peaks 1.2, 1.08, 0.7 -> 2.98 / 3.
    # Held, from the first crossing on: s0 0.95 1.05 1.2 0.8 -> 2/4; s1 0.92 1.0 1.08 -> 3/3;
    # s2 never reached -> left out: IQM of (0.5, 1) = 0.75 in [0.5, 1].
    # End (the mean of the last 5 probes): 4.5/5, 3.9/5, 2.4/5 -> 0.72 in [0.48, 0.9].
    assert sharp["dqn"][3:] == ["3/3", "5, 5, 5", "0.99 [0.70, 1.20]", "0.72 [0.48, 0.90]", "0.40 [0.00, 0.60]",
                                "0.33 [0.00, 0.60]",
                                "0.75 [0.50, 1.00] (2/3 reached)", "300 (s0 200, s1 300, s2 never)", "0/3"]
    # c51. Reached: 0/3 (NaN is not), 3/3, 1/3 -> IQM 4/9 in [0, 1]. At the edge: 0, 2/3
    # (0.9 and 1.1 are inside), 1/3 -> IQM 1/3 in [0, 2/3]. First: never, 100, 200 -> 200.
    # Peaks: 0.2 (the NaN is left out), 1.2, 0.95 -> 2.35 / 3. Held: s1 0.9 1.1 1.2 -> 2/3,
    # s2 0.95 0.5 -> 1/2: IQM 7/12 in [1/2, 2/3].
    # End: (0.1 + 0.2)/2 (the NaN left out), 3.2/3, 1.95/3 -> 0.62 in [0.15, 1.07].
    assert sharp["c51"][3:] == ["3/3", "3, 3, 3", "0.78 [0.20, 1.20]", "0.62 [0.15, 1.07]", "0.44 [0.00, 1.00]",
                                "0.33 [0.00, 0.67]",
                                "0.58 [0.50, 0.67] (2/3 reached)", "200 (s0 never, s1 100, s2 200)", "1/3"]
    # Batch sharpness: only dqn's probes have it; every one is at the threshold (ratio 1).
    batch = table_rows(text, "Batch sharpness relative to the stability threshold")
    assert list(batch) == ["dqn"]
    assert batch["dqn"][3:] == ["3/3", "5, 5, 5", "1.00 [1.00, 1.00]", "1.00 [1.00, 1.00]", "1.00 [1.00, 1.00]",
                                "1.00 [1.00, 1.00]",
                                "1.00 [1.00, 1.00] (3/3 reached)", "100 (s0 100, s1 100, s2 100)", "0/3"]
    # The report says which return, which probes and which median it means.
    for definition in ("the `final_eval_return` of its `finished` event", "the fraction of *all* its probes",
                       "counts *never* as later than any update", "band: min–max over seeds"):
        assert definition in text
    for png in ("sharpness_over_threshold.png", "batch_sharpness_over_threshold.png", "final_returns.png"):
        assert f"](plots/{png})" in text and (tmp_path / "out" / "plots" / png).stat().st_size > 5_000


def test_a_run_still_going_is_left_out_of_the_tables(tmp_path):
    """A seed cut (or still running) has no `finished` event: its last probes are not its
    end, so the λ₁ table counts only the finished seed."""
    path = write_study(tmp_path, {"name": "seeds", "base": CARTPOLE, "seeds": [0, 1],
                                  "stages": [{"name": "s", "runs": [{"name": "r"}]}]})
    specs = st.plan_study(st.load_study(path), path, tmp_path / "out")
    write_metrics(specs[0].run_dir, [probe(100, 0.5), probe(200, 0.8), finished(200, "completed", 1.0)])
    write_metrics(specs[1].run_dir, [probe(100, 0.1)])  # cut after its first probe
    text = st.write_report(st.load_study(path), path, tmp_path / "out", specs, {}).read_text()
    row = table_rows(text, "λ₁ relative to the stability threshold")["r"]
    assert row[3:6] == ["1/2", "2", "0.80 [0.80, 0.80]"]


def test_ratios_spanning_decades_get_a_linear_view_beside_the_log_axis(tmp_path):
    """A long run's λ₁ climbs from 0.001 of the threshold: the log axis keeps its start in
    view and compresses the approach; a second figure shows it on a linear axis. Ratios
    within two decades of the threshold get the one (linear) figure."""
    for name, ratios, linear in (("climb", [0.001, 0.1, 0.85, 0.9], True), ("near", [0.3, 0.9, 1.05], False)):
        (tmp_path / name).mkdir()
        path = write_study(tmp_path / name, {"name": name, "base": CARTPOLE,
                                             "stages": [{"name": "s", "runs": [{"name": "r"}]}]})
        specs = st.plan_study(st.load_study(path), path, tmp_path / name / "out")
        write_metrics(specs[0].run_dir, [probe(100 * (i + 1), r) for i, r in enumerate(ratios)]
                      + [finished(100 * len(ratios), "completed", 1.0)])
        text = st.write_report(st.load_study(path), path, tmp_path / name / "out", specs, {}).read_text()
        png = tmp_path / name / "out" / "plots" / "sharpness_over_threshold_linear.png"
        assert ("](plots/sharpness_over_threshold_linear.png)" in text) == linear == png.exists()


def test_report_without_batch_sharpness_has_no_batch_table(tmp_path):
    path = write_study(tmp_path, {"name": "seeds", "base": CARTPOLE, "seeds": [0, 1],
                                  "stages": [{"name": "s", "runs": [{"name": "r"}]}]})
    specs = st.plan_study(st.load_study(path), path, tmp_path / "out")
    write_metrics(specs[0].run_dir, probes(100, 400) + ended(200, "completed", 1.0))
    write_metrics(specs[1].run_dir, probes(100) + ended(200, "completed", 3.0))
    text = st.write_report(st.load_study(path), path, tmp_path / "out", specs, {}).read_text()
    # 2 seeds: the IQM is the mean 2; a resample of one seed twice has probability 1/4.
    assert table_rows(text, "Final evaluation return")["r"][3:5] == ["2/2", "2.00 [1.00, 3.00]"]
    # Seed 0: 0.25 and 1.0 -> end 0.625, reached 1/2, at the edge 1/2; seed 1: 0.25 -> 0.25, 0, 0.
    assert table_rows(text, "λ₁ relative to the stability threshold")["r"][3:5] + \
        table_rows(text, "λ₁ relative to the stability threshold")["r"][6:9] == \
        ["2/2", "2, 1", "0.44 [0.25, 0.62]", "0.25 [0.00, 0.50]", "0.25 [0.00, 0.50]"]
    assert "Batch sharpness" not in text and "batch_sharpness_over_threshold.png" not in text
    assert "### Hessian λ₁ (raw)" not in text  # plain SGD probes have no raw_sharpness


def test_report_aggregates_the_raw_hessian_sharpness_of_adaptive_optimisers(tmp_path):
    """Breaks if the raw λ₁ (the Hessian's own, which an Adam probe records beside the
    preconditioned one) is not aggregated, or a non-finite value enters its peak or end."""
    path = write_study(tmp_path, {"name": "seeds", "base": CARTPOLE, "seeds": [0, 1],
                                  "stages": [{"name": "s", "runs": [{"name": "r"}]}]})
    specs = st.plan_study(st.load_study(path), path, tmp_path / "out")
    for spec, raw in zip(specs, ([10.0, 30.0, 20.0], [40.0, "nan"])):
        records = probes(*[1.0] * len(raw))
        for record, value in zip(records, raw):
            record["raw_sharpness"] = value
        write_metrics(spec.run_dir, records + ended(100 * len(raw), "completed", 1.0))
    text = st.write_report(st.load_study(path), path, tmp_path / "out", specs, {}).read_text()
    # Seed 0: peak 30, end (10+30+20)/3 = 20; seed 1: the NaN left out, peak = end = 40.
    # Two seeds: the IQM is the mean, the interval the two values.
    assert table_rows(text, "Hessian λ₁ (raw) under an adaptive optimiser")["r"][3:] == \
        ["2/2", "3, 1", "35.00 [30.00, 40.00]", "30.00 [20.00, 40.00]", "20.00, 40.00"]


# ----------------------------------------------------------------------------
# End to end (about 2 minutes on 2 cores with --parallel 2 and --vmap-seeds). The step-size sweep's small
# variant replaced the regimes one here (eos_regimes_minatar_small.yaml is still planned
# by test_shipped_studies_plan): it runs the same pipeline, and seeds and the across-seed
# report besides, in the same time.


@pytest.mark.slow
@pytest.mark.xdist_group("learning")  # CPU-bound: never beside another learning run (Makefile, test)
def test_small_lr_sweep_study_end_to_end(tmp_path):
    path = CONFIGS / "studies" / "eos_lr_sweep_minatar_small.yaml"
    out = tmp_path / "study"
    started: list = []
    # --vmap-seeds: each agent's 2 step sizes × 2 seeds as one program (one start-up and
    # compilation instead of four), each run's directory written as if it ran alone.
    result = st.run_study(path, parallel=2, out=out, echo=started.append, vmap_seeds=True)
    assert sum("as one program" in line for line in started) == 2, started
    rows = result["rows"]
    assert len(rows) == 10  # 2 recordings, DQN and C51 × 2 step sizes × 2 seeds offline
    bad = [(r["stage"], r["run"], r["status"]) for r in rows if r["status"] not in st.FINISHED]
    assert not bad, f"runs did not finish: {bad}; logs in {out}"
    text = (out / "report.md").read_text()
    for r in rows:
        assert f"[{r['run']}]({r['stage']}/{r['run']})" in text
    probed = [r for r in rows if r["stage"] == "sweep"]
    assert all(r["probes"] >= 3 and r["max_sharpness"] is not None for r in probed)
    for seed in (0, 1):  # each seed recorded its own dataset, and its offline runs read it
        assert (out / "record" / f"collect_seed-{seed}" / "dataset").is_dir()
        assert f"regime.dataset={out.resolve()}/record/collect_seed-{seed}/dataset" in text
    # The aggregated tables: a row per group of 2 seeds, every number filled in.
    returns = table_rows(text, "Final evaluation return")
    sharp = table_rows(text, "λ₁ relative to the stability threshold")
    groups = [f"{k}_lr-{lr}_offline" for k in ("dqn", "c51") for lr in ("0.016", "0.064")]
    assert list(returns) == ["collect"] + groups and list(sharp) == groups
    for group in groups:
        assert returns[group][3] == "2/2" and re.fullmatch(r"[-\d.]+ \[[-\d.]+, [-\d.]+\]", returns[group][4])
        assert sharp[group][3] == "2/2" and sharp[group][-1] == "0/2"
        assert all(int(n) >= 3 for n in sharp[group][4].split(", "))  # probes per seed
        assert all(re.fullmatch(r"[\d.]+ \[[\d.]+, [\d.]+\]", cell) for cell in sharp[group][5:9])
    for png in ("sharpness_over_threshold.png", "final_returns.png"):
        assert (out / "plots" / png).stat().st_size > 5_000
    # A second invocation only rebuilds the report.
    lines = []
    st.run_study(path, out=out, echo=lines.append)
    assert sum("skipped, already finished" in line for line in lines) == 10
