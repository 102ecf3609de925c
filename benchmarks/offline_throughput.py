"""Offline `eosrl train` updates/s against the bare jitted update, in the same process.

MinAtar CNN, batch 512 (the edge-of-stability setting), probes off and at the paper's
cadence (λ₁ every 100 updates; top-5 and batch sharpness every 1,000).

    python benchmarks/offline_throughput.py [--updates N] [--transitions T]

The dataset is made here: T transitions of random sparse MinAtar Breakout frames,
written through the real `DatasetWriter`. A run's rate is the mean of its `train`
records' `updates_per_second` after update 1,000 (those before hold the compilation
of the update, the λ₁ probe and the first full probe); the bare
update is timed before and after the runs and averaged, so a machine whose load
changes during the benchmark (a shared one) skews the ratios less.
Prints each figure and `ratio off: X` and `ratio paper: Y` (targets >= 0.95 and >= 0.7).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from eosrl.launch.builder import Builder  # noqa: E402
from eosrl.launch.config import load_config  # noqa: E402
from eosrl.agents.dataset import DatasetWriter  # noqa: E402
from eosrl.launch.rundir import read_metrics  # noqa: E402
from eosrl.launch.train import train  # noqa: E402
from benchmarks import record  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "eos_dqn_minatar_breakout.yaml"
PAPER_PROBES = ["probe.enabled=true", "probe.every=100", "probe.full_every=1000", "probe.num_eigs=5",
                "probe.batch_sharpness_batches=4"]


def record_dataset(path: Path, config, transitions: int, seed: int = 0) -> None:
    """Random episodes of 100 steps (the last truncated) in the env's shapes."""
    spec = Builder(config).spec
    rng = np.random.default_rng(seed)
    obs = lambda: rng.random(spec.obs_shape) < 0.1  # noqa: E731  sparse bool object maps
    writer = DatasetWriter.for_env(path, config.env)
    written = 0
    while written < transitions:
        writer.add_first(obs())
        for t in range(100):
            writer.add(int(rng.integers(spec.num_actions)), float(rng.random() < 0.05), False, t == 99, obs())
        written += 100
    writer.close()


def bare_rate(config, count: int) -> float:
    """The learner's jitted update on one pre-made device batch."""
    builder = Builder(config)
    learner = builder.make_learner()
    rng = np.random.default_rng(0)
    layout = builder.layout
    b = config.replay.batch_size
    frames = rng.random((b, layout.frame_stack) + tuple(layout.frame_shape)) < 0.1
    items = layout.items(frames, rng.integers(0, builder.spec.num_actions, b), rng.random(b), np.full(b, 0.99),
                         frames[::-1])
    batch = jax.device_put(items)
    jax.block_until_ready(learner.update(batch))  # compile
    start = time.perf_counter()
    for _ in range(count):
        out = learner.update(batch)
    jax.block_until_ready(out)
    return count / (time.perf_counter() - start)


def train_rate(config, run_dir: Path) -> float:
    """Steady `eosrl train` updates/s: the `train` records after update 1,000."""
    summary = train(config, run_dir, progress=False)
    assert summary["status"] == "completed", summary
    rates = [r["updates_per_second"] for r in read_metrics(run_dir / "metrics.jsonl", "train") if r["step"] > 1000]
    return float(np.mean(rates))


def main() -> None:
    parser = record.add_flag(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--updates", type=int, default=3000, help="updates per train run (more than 1,000)")
    parser.add_argument("--transitions", type=int, default=10_000)
    parser.add_argument("--old-probes", action="store_true",
                        help="paper cadence as top-5 every 100 (for code without probe.full_every)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = load_config(CONFIG)
        record_dataset(tmp / "data", base, args.transitions)
        common = ["regime.mode=offline", f"regime.dataset={tmp / 'data'}", f"run.total_updates={args.updates}",
                  "run.log_every=500", "run.eval_every=0", "run.eval_episodes=1",
                  f"run.checkpoint_every={args.updates}", "replay.checkpoint=false"]
        paper = (["probe.enabled=true", "probe.every=100", "probe.num_eigs=5"] if args.old_probes
                 else PAPER_PROBES)
        bare_before = bare_rate(base, 300)
        off = train_rate(load_config(CONFIG, common + ["probe.enabled=false"]), tmp / "off")
        with_probes = train_rate(load_config(CONFIG, common + paper), tmp / "paper")
        bare = (bare_before + bare_rate(base, 300)) / 2
    print(f"MinAtar CNN, batch {base.replay.batch_size}, {args.updates} updates per run, "
          f"{jax.devices()[0].platform}")
    print(f"bare jitted update (pre-made batch): {bare:8.1f} updates/s")
    print(f"offline eosrl train, probes off:      {off:8.1f} updates/s")
    print(f"offline eosrl train, paper cadence:   {with_probes:8.1f} updates/s  ({' '.join(paper)})")
    print(f"ratio off: {off / bare:.3f}  (target >= 0.95)")
    print(f"ratio paper: {with_probes / bare:.3f}  (target >= 0.7)")
    cadence = "paper cadence" if not args.old_probes else "top-5 every 100"
    record.save(args, [
        record.figure("offline train, MinAtar CNN, batch 512, probes off", round(off, 1), "updates/s",
                       baselines={"bare": round(bare, 1)}, target="≥ 0.95 × bare"),
        record.figure(f"offline train, MinAtar CNN, batch 512, {cadence}", round(with_probes, 1), "updates/s",
                       baselines={"bare": round(bare, 1)}, target="≥ 0.7 × bare")])


if __name__ == "__main__":
    main()
