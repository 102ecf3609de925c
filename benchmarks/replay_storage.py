"""Bytes per stored Atari transition in the Reverb replay table.

Fills the table with real Pong frames (random policy, Dopamine preprocessing)
through the project's adder, checkpoints the server and divides the
checkpoint's size by the number of items. A transition that stored its two
stacked observations would cost 2 x 4 x 84 x 84 = 56,448 bytes; storing each
frame once should cost about one 7,056-byte frame or less (chunks are
compressed).

    python benchmarks/replay_storage.py [--transitions 100000]
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

import numpy as np  # noqa: E402
import reverb  # noqa: E402

from eosrl.agents import replay  # noqa: E402
from eosrl.launch.config import load_config  # noqa: E402
from eosrl.envs.factory import make_env  # noqa: E402
from eosrl.launch.builder import Builder  # noqa: E402
from benchmarks import record  # noqa: E402

FRAME_BYTES = 84 * 84


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = record.add_flag(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--transitions", type=int, default=100_000)
    parser.add_argument("--n-step", type=int, default=1)
    args = parser.parse_args()
    config = load_config("configs/dqn_atari_pong.yaml", [f"agent.n_step={args.n_step}"])
    parts = Builder(config)
    with tempfile.TemporaryDirectory() as tmp:
        server = replay.start_server(
            [replay.replay_table(args.transitions + 10, 1, parts.signature())], checkpoint_dir=tmp)
        client = reverb.Client(f"localhost:{server.port}")
        adder = parts.make_adder(client)
        env = make_env(config.env, seed=0)
        rng = np.random.default_rng(0)
        start = time.time()
        obs, _ = env.reset()
        adder.add_first(obs)
        while adder.items_written < args.transitions:
            action = int(rng.integers(parts.spec.num_actions))
            obs, reward, terminated, truncated, _ = env.step(action)
            adder.add(action, float(np.clip(reward, -1, 1)), terminated, truncated, obs)
            if terminated or truncated:
                obs, _ = env.reset()
                adder.add_first(obs)
        adder.flush()
        items = replay.table_size(client)
        path = Path(client.checkpoint())
        size = directory_bytes(path)
        server.stop()
    per_item = size / items
    print(f"{items} Pong transitions (n-step {args.n_step}) written in {time.time() - start:.0f} s")
    print(f"Reverb checkpoint: {size / 2**20:.1f} MiB -> {per_item:,.0f} bytes per transition")
    print(f"ratio to one 84x84 frame ({FRAME_BYTES} bytes): {per_item / FRAME_BYTES:.3f}")
    print(f"ratio to two stacked observations ({8 * FRAME_BYTES} bytes): {per_item / (8 * FRAME_BYTES):.4f}")
    n_step = "" if args.n_step == 1 else f", n-step {args.n_step}"
    record.save(args, [record.figure(f"bytes per stored Pong transition{n_step}", round(per_item), "bytes",
                                     baselines={"one frame": FRAME_BYTES, "two stacked observations": 8 * FRAME_BYTES},
                                     target="≈ one frame or less")])


if __name__ == "__main__":
    main()
