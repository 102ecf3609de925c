"""Wall-clock overhead of probing every 100 updates in a MinAtar run: the same
short `eosrl train` run of configs/eos_dqn_minatar_breakout.yaml (batch 512,
SGD momentum) with probes off and on, in the same process.

    python benchmarks/probe_overhead.py [--env-steps N]
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

from eosrl.agents.config import load_config  # noqa: E402
from eosrl.launch.rundir import read_metrics  # noqa: E402
from eosrl.launch.train import train  # noqa: E402


def timed_run(probe: bool, env_steps: int, directory: Path) -> tuple:
    config = load_config("configs/eos_dqn_minatar_breakout.yaml", [
        f"probe.enabled={str(probe).lower()}", f"run.total_env_steps={env_steps}",
        "replay.min_size=1000", "run.eval_every=0", "run.eval_episodes=1",
        f"run.checkpoint_every={env_steps}", "replay.checkpoint=false", "agent.epsilon_decay_steps=1000"])
    start = time.perf_counter()
    summary = train(config, directory, progress=False)
    seconds = time.perf_counter() - start
    probes = list(read_metrics(directory / "metrics.jsonl", "probe"))
    return seconds, summary["learner_updates"], probes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-steps", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base, updates, _ = timed_run(False, args.env_steps, Path(tmp) / "off")
        probed, _, probes = timed_run(True, args.env_steps, Path(tmp) / "on")
    probe_seconds = sum(p["seconds"] for p in probes)
    print(f"MinAtar DQN, batch 512, {args.env_steps} env steps, {updates} updates, {len(probes)} probes "
          f"(top-5 Lanczos, 30 iterations, batch 512)")
    print(f"without probes: {base:7.1f} s")
    print(f"with probes:    {probed:7.1f} s   (probe time recorded in the probes: {probe_seconds:.1f} s, "
          f"{probe_seconds / max(1, len(probes)):.2f} s each incl. the first compile)")
    print(f"overhead: {probed / base - 1:+.1%} wall clock")


if __name__ == "__main__":
    main()
