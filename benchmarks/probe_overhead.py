"""What Hessian probes cost the learner, at the paper's protocol: MinAtar Breakout,
DQN (configs/eos_dqn_minatar_breakout.yaml: batch 512, SGD momentum), the top-5
eigenvalues on a fixed batch of 512 every 100 updates, in offline launches
(replay server + learner [+ prober]) on a recorded dataset:

  off       probes disabled (the baseline, measured in the same run)
  inline    the learner probes between its updates (probe.mode: inline)
  process   a prober process measures the learner's snapshots (probe.mode: process)

It prints learner updates/s of each (after the first train record, so compilation
is left out), the ratios to `off`, the snapshots the prober skipped, and the HVPs
per probe: the first probe (a cold start) against the warm-started ones, at
probe.tolerance (1e-3). Then, on the process run's last snapshot and batch, the
HVPs a cold start needs for the same accuracy, for a like-for-like comparison.

    python benchmarks/probe_overhead.py [--updates 5000] [--dataset-steps 20000]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eosrl.launch.rundir import read_metrics  # noqa: E402
from benchmarks import record  # noqa: E402

CONFIG = "configs/eos_dqn_minatar_breakout.yaml"
MODES = {"off": ["probe.enabled=false"], "inline": ["probe.mode=inline"], "process": ["probe.mode=process"]}


def record_dataset(path: Path, steps: int) -> None:
    """ε-greedy steps of the untrained network (min_size = the budget: no updates)."""
    from eosrl.launch.config import load_config
    from eosrl.launch.train import train
    train(load_config(CONFIG, [f"run.total_env_steps={steps}", f"replay.min_size={steps}",
                               f"replay.capacity={steps}", "run.eval_every=0", "run.eval_episodes=1",
                               "replay.checkpoint=false", f"replay.record_to={path}", "probe.enabled=false"]),
          path.parent / "record_run", progress=False)


def launch(mode: str, dataset: Path, updates: int, run_dir: Path) -> List[Dict]:
    sets = ["regime.mode=offline", f"regime.dataset={dataset}", f"run.total_updates={updates}",
            "run.eval_every=0", "run.eval_episodes=1", "run.log_every=500", f"run.checkpoint_every={updates}",
            "replay.min_size=5000", *MODES[mode]]
    cmd = [sys.executable, "-m", "eosrl.launch.cli", "launch", CONFIG, "--run-dir", str(run_dir), "--no-progress"]
    for item in sets:
        cmd += ["--set", item]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return list(read_metrics(run_dir / "metrics.jsonl"))


def updates_per_second(records: List[Dict]) -> float:
    train = [r for r in records if r["kind"] == "train"][1:]  # the first window holds the compile
    return (train[-1]["step"] - train[0]["step"]) / (train[-1]["time"] - train[0]["time"])


def cold_start_hvps(run_dir: Path) -> Dict:
    """A cold-started probe of the last checkpoint on the run's probe batch, with the same
    tolerance, and one with 30 Lanczos steps (the old default protocol) for reference."""
    import numpy as np
    from eosrl.agents import checkpoint
    from eosrl.launch.builder import Builder
    from eosrl.launch.config import load_config
    from eosrl.agents.probes import Prober
    from eosrl.launch.prober import load_probe_batch
    config = load_config(run_dir / "config.yaml")
    builder = Builder(config)
    learner = builder.make_learner()
    builder.restore(learner, checkpoint.latest(run_dir / "checkpoints"))
    batch = learner.preprocess(load_probe_batch(run_dir))
    snap = Prober(config.probe, learner.agent, learner.loss_fn, learner.network).snapshot(
        learner.state, learner.current_lr(), 0)
    out = {}
    for name, probe_config in (("lobpcg_cold", config.probe),
                               ("lanczos_30", dataclasses.replace(config.probe, method="lanczos"))):
        prober = Prober(probe_config, learner.agent, learner.loss_fn, learner.network)
        prober.probe(snap, batch)  # compile
        prober.forget_vectors()    # a cold start again, now timed
        out[name] = prober.probe(snap, batch)
    top = np.asarray(out["lanczos_30"]["eigenvalues"])
    out["agreement"] = float(np.max(np.abs(np.asarray(out["lobpcg_cold"]["eigenvalues"]) - top) / abs(top[0])))
    return out


def main() -> None:
    parser = record.add_flag(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--updates", type=int, default=5000)
    parser.add_argument("--dataset-steps", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Path(tmp) / "dataset"
        record_dataset(dataset, args.dataset_steps)
        runs = {mode: launch(mode, dataset, args.updates, Path(tmp) / mode) for mode in MODES}
        cold = cold_start_hvps(Path(tmp) / "process")
    rates = {mode: updates_per_second(records) for mode, records in runs.items()}
    warm_hvps, warm_seconds, skips = {}, {}, {}
    print(f"MinAtar Breakout DQN offline, batch 512, {args.updates} updates, top-5 every 100 updates on a "
          f"fixed batch of 512, probe.tolerance 1e-3 ({args.dataset_steps}-step dataset)")
    for mode, records in runs.items():
        line = f"  {mode:8s} {rates[mode]:6.1f} updates/s  ({rates[mode] / rates['off']:.2f} x off)"
        probes = [r for r in records if r["kind"] == "probe"]
        if probes:
            skipped = [r for r in records if r["kind"] == "event" and r.get("event") == "probe_skipped"]
            warm = [p for p in probes if p.get("warm_start")]
            warm_hvps[mode] = sum(p["hvps"] for p in warm) / max(1, len(warm))
            warm_seconds[mode] = sum(p["seconds"] for p in warm) / max(1, len(warm))
            skips[mode] = len(skipped)
            line += (f"; {len(probes)} probes, {len(skipped)} skipped; HVPs cold {probes[0]['hvps']}, warm mean "
                     f"{warm_hvps[mode]:.1f}; seconds per warm probe {warm_seconds[mode]:.2f}; "
                     f"unconverged pairs {sum(not c for p in probes for c in p['converged'])}")
        print(line)
    print(f"  on the last snapshot: cold lobpcg {cold['lobpcg_cold']['hvps']} HVPs, "
          f"{cold['lobpcg_cold']['seconds']:.2f} s; 30 Lanczos steps {cold['lanczos_30']['hvps']} HVPs, "
          f"{cold['lanczos_30']['seconds']:.2f} s; top-5 agree to {cold['agreement']:.1e} of λ₁")
    off = {"off": round(rates["off"], 1)}
    record.save(args, [
        record.figure("learner with probes inline", round(rates["inline"], 1), "updates/s", baselines=off,
                      target="≥ 0.75 × off"),
        record.figure("learner with probes in a prober process", round(rates["process"], 1), "updates/s",
                      baselines=off, details={"snapshots skipped": skips["process"]},
                      target="≥ 0.9 × off, no skipped snapshot"),
        record.figure("HVPs per warm-started probe", [round(min(warm_hvps.values()), 1), round(max(warm_hvps.values()), 1)],
                      "HVPs"),
        record.figure("time per warm probe inline", round(warm_seconds["inline"], 2), "s"),
        record.figure("time per warm probe in the prober", round(warm_seconds["process"], 2), "s"),
        record.figure("cold start on the last snapshot", round(cold["lobpcg_cold"]["seconds"], 2), "s",
                      details={"HVPs": cold["lobpcg_cold"]["hvps"], "old protocol HVPs": cold["lanczos_30"]["hvps"],
                               "old protocol s": round(cold["lanczos_30"]["seconds"], 2)})])


if __name__ == "__main__":
    main()
