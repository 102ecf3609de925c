"""Tests of `eosrl study` (launch.study): grid expansion and run names, substitution,
planning, skipping finished runs, the runner's handling of failed and diverged
runs (with stand-in commands instead of training), the report from hand-written
run dirs, and the small MinAtar regimes study end to end."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import yaml

from eosrl.agents.config import parse_overrides
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


@pytest.mark.parametrize("path", sorted((CONFIGS / "studies").glob("*.yaml")), ids=lambda p: p.name)
@pytest.mark.slow
def test_shipped_studies_plan(path, tmp_path):
    specs = st.plan_study(st.load_study(path), path, tmp_path)
    kinds = {(s.config.agent.kind, s.values.get("regime")) for s in specs if s.stage == "regimes"}
    assert len(kinds) == 10  # DQN and C51 in five regimes
    assert all(s.deps == ["record/collect"] for s in specs if s.config.regime.mode == "offline")
    assert specs[0].config.replay.record_to.startswith(str(tmp_path))


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
    from eosrl.agents.config import save_config
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


def test_study_parser():
    parser = argparse.ArgumentParser(prog="eosrl")
    st.add_study_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["study", "s.yaml", "--parallel", "3", "--out", "o", "--dry-run"])
    assert (args.study, args.parallel, args.out, args.dry_run, args.func) == ("s.yaml", 3, "o", True, st.cmd_study)
    assert parser.parse_args(["study", "s.yaml"]).parallel == 1
    with pytest.raises(st.StudyError, match="--parallel"):
        st.cmd_study(argparse.Namespace(study="s.yaml", parallel=0, out=None, dry_run=False))


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
    for png in ("sharpness_by_regime.png", "final_returns.png"):
        assert f"](plots/{png})" in text
        assert (tmp_path / "out" / "plots" / png).stat().st_size > 5_000


def test_report_without_probes_or_returns_says_so(tmp_path):
    path = write_study(tmp_path, {"name": "x", "base": CARTPOLE, "stages": [{"name": "a", "runs": [{"name": "r"}]}]})
    specs = st.plan_study(st.load_study(path), path, tmp_path / "out")
    text = st.write_report(st.load_study(path), path, tmp_path / "out", specs, {}).read_text()
    assert "| a | [r](a/r) | – | not run |" in text
    assert text.count("no data to plot") == 2


# ----------------------------------------------------------------------------
# End to end (about 3 minutes on 2 cores with --parallel 2).


@pytest.mark.slow
def test_small_regimes_study_end_to_end(tmp_path):
    path = CONFIGS / "studies" / "eos_regimes_minatar_small.yaml"
    out = tmp_path / "study"
    result = st.run_study(path, parallel=2, out=out, echo=lambda line: None)
    rows = result["rows"]
    assert len(rows) == 11
    bad = [(r["stage"], r["run"], r["status"]) for r in rows if r["status"] not in st.FINISHED]
    assert not bad, f"runs did not finish: {bad}; logs in {out}"
    text = (out / "report.md").read_text()
    for r in rows:
        assert f"[{r['run']}]({r['stage']}/{r['run']})" in text
    probed = [r for r in rows if r["stage"] == "regimes"]
    assert all(r["probes"] >= 3 and r["max_sharpness"] is not None for r in probed)
    assert (out / "record" / "collect" / "dataset").is_dir()
    assert (out / "plots" / "sharpness_by_regime.png").is_file()
    # A second invocation only rebuilds the report.
    lines = []
    st.run_study(path, out=out, echo=lines.append)
    assert sum("skipped, already finished" in line for line in lines) == 11
