"""End-to-end throughput of `eosrl launch` with 1 and 2 actors: env steps/s
(summed over actors) and learner updates/s, read from the run's metrics, against
the bare jitted update on a pre-made batch measured in the same run (target:
launch updates/s ≥ 0.8 × bare).

    python benchmarks/end_to_end.py [--config configs/dqn_minatar_breakout.yaml] [--env-steps N]

The rate limiter fixes samples per insert (batch_size / update_period), so
updates/s follows env steps/s; on 2 cores the learner, the actors and the replay
server share the CPU, which bounds both.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eosrl.launch.rundir import read_metrics  # noqa: E402
from benchmarks import record  # noqa: E402


def bare_update(config_path: str, updates: int = 1000) -> float:
    """Updates/s of the config's jitted update on one pre-made batch, in this process."""
    import jax
    import numpy as np
    from eosrl.launch.builder import Builder
    from eosrl.launch.config import load_config
    builder = Builder(load_config(config_path))
    learner = builder.make_learner()
    batch = jax.device_put({key: np.zeros((builder.config.replay.batch_size,) + tuple(spec.shape),
                                          spec.dtype.as_numpy_dtype) for key, spec in builder.signature().items()})
    jax.block_until_ready(learner.update(batch))  # compile
    start = time.perf_counter()
    for _ in range(updates):
        metrics = learner.update(batch)
    jax.block_until_ready(metrics)
    return updates / (time.perf_counter() - start)


def run(config: str, actors: int, env_steps: int, run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "eosrl.launch.cli", "launch", config, "--actors", str(actors),
           "--run-dir", str(run_dir), "--no-progress", "--set", f"run.total_env_steps={env_steps}",
           "--set", "run.eval_every=0", "--set", "run.eval_episodes=1", "--set", "replay.min_size=2000",
           "--set", "replay.checkpoint=false", "--set", "run.log_every=1000"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    train = list(read_metrics(run_dir / "metrics.jsonl", "train"))[1:]  # skip the compile window
    first, last = train[0], train[-1]
    seconds = last["time"] - first["time"]
    return {"env_steps_per_second": (last["env_steps"] - first["env_steps"]) / seconds,
            "updates_per_second": (last["step"] - first["step"]) / seconds}


def main() -> None:
    parser = record.add_flag(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--config", default="configs/dqn_minatar_breakout.yaml")
    parser.add_argument("--env-steps", type=int, default=30_000)
    args = parser.parse_args()
    bare = bare_update(args.config)
    print(f"bare jitted update (pre-made batch): {bare:7.1f} updates/s", flush=True)
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        for actors in (1, 2):
            r = run(args.config, actors, args.env_steps, Path(tmp) / f"a{actors}")
            print(f"{actors} actor(s): {r['env_steps_per_second']:7.1f} env steps/s, "
                  f"{r['updates_per_second']:7.1f} updates/s ({r['updates_per_second'] / bare:.2f} × bare, "
                  f"target ≥ 0.8)", flush=True)
            figures.append(record.figure(f"eosrl launch, {actors} actor{'s' if actors > 1 else ''}",
                                         round(r["updates_per_second"], 1), "updates/s",
                                         baselines={"bare": round(bare, 1)},
                                         details={"env steps/s": round(r["env_steps_per_second"], 1)},
                                         target="updates/s ≥ 0.8 × bare"))
    record.save(args, figures)


if __name__ == "__main__":
    main()
