"""The `eosrl` command: train, evaluate, plot (and the roles of a distributed run).

Every subcommand checks its input first (config keys, env names, paths) and
fails with one line naming what is wrong, before any process or server starts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

# Keep TensorFlow's and absl's start-up noise away from users.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", category=DeprecationWarning)


class UsageError(Exception):
    """Bad input from the command line: reported as one line, exit code 2."""


def _fail(message: str) -> int:
    print(f"eosrl: error: {message}", file=sys.stderr)
    return 2


def _load(config_path: str, overrides: List[str]):
    from agents.config import load_config
    from agents.networks import layer_names, resolve_network
    from agents import spectral_norm
    from envs.factory import validate_env_config
    config = load_config(config_path, overrides)
    validate_env_config(config.env)
    # Layer selection depends on the network, so check it here too.
    kind = resolve_network(config.agent, config.env.kind)
    spectral_norm.resolve_layers(config.agent.spectral_norm.layers,
                                 layer_names(kind, config.agent.hidden_sizes))
    return config


def _print_summary(summary: dict) -> None:
    print()
    print(f"Run {summary['status']}: {summary['env_steps']} env steps, "
          f"{summary['learner_updates']} learner updates in {summary['wall_seconds']} s")
    if summary.get("final_eval_return") is not None:
        print(f"  final evaluation return: {summary['final_eval_return']:.2f}")
    print(f"  run directory:  {summary['run_dir']}  (metrics.jsonl, tb/, checkpoints/)")
    if summary.get("checkpoint"):
        print(f"  last checkpoint: {summary['checkpoint']}")
    print(f"  next: eosrl evaluate {summary['run_dir']}   |   eosrl plot {summary['run_dir']}")


def cmd_train(args) -> int:
    from launch.rundir import RunDir
    if args.resume:
        run_dir = RunDir(args.resume)
        if not run_dir.config.is_file():
            raise UsageError(f"--resume {args.resume}: no config.yaml there (is it a run directory?)")
        from agents import checkpoint
        if checkpoint.latest(run_dir.checkpoints) is None:
            raise UsageError(f"--resume {args.resume}: no checkpoint in {run_dir.checkpoints}")
        config = _load(str(run_dir.config), args.set)
        path = run_dir.path
    else:
        if not args.config:
            raise UsageError("train: give a CONFIG file or --resume RUN_DIR")
        config = _load(args.config, args.set)
        path = Path(args.run_dir or Path("runs") / config.name)
        if (path / "metrics.jsonl").exists() and not args.overwrite:
            raise UsageError(f"run directory {path} already holds a run "
                             f"(use --resume {path}, --run-dir DIR or --overwrite)")
        if args.overwrite and path.exists():
            import shutil
            shutil.rmtree(path)
    from launch.rundir import route_native_logs
    route_native_logs(path / "native.log")
    from launch.train import train
    summary = train(config, path, resume=bool(args.resume), progress=not args.no_progress)
    _print_summary(summary)
    return 0 if summary["status"] == "completed" else 1


def _resolve_checkpoint(target: str):
    """(config path, checkpoint path, run dir or None) from a run dir or a checkpoint file."""
    from agents import checkpoint
    path = Path(target)
    if path.is_dir():
        ckpt = checkpoint.latest(path / "checkpoints")
        if not (path / "config.yaml").is_file():
            raise UsageError(f"{path}: no config.yaml (expected a run directory or a ckpt_*.npz file)")
        if ckpt is None:
            raise UsageError(f"{path}: no checkpoint in {path / 'checkpoints'}")
        return path / "config.yaml", ckpt, path
    if path.is_file() and path.suffix == ".npz":
        run_dir = path.parent.parent
        if not (run_dir / "config.yaml").is_file():
            raise UsageError(f"{path}: no config.yaml in {run_dir} (checkpoints live in RUN_DIR/checkpoints/)")
        return run_dir / "config.yaml", path, run_dir
    raise UsageError(f"{target}: not a run directory or a checkpoint file (ckpt_*.npz)")


def cmd_evaluate(args) -> int:
    config_path, ckpt, run_path = _resolve_checkpoint(args.target)
    if args.video and Path(args.video).suffix.lower() != ".gif":
        raise UsageError(f"--video {args.video}: the video is written as an animated GIF; use a .gif path")
    if args.episodes is not None and args.episodes <= 0:
        raise UsageError(f"--episodes: must be > 0, got {args.episodes}")
    if args.epsilon is not None and not 0.0 <= args.epsilon <= 1.0:
        raise UsageError(f"--epsilon: must be in [0, 1], got {args.epsilon}")
    config = _load(str(config_path), [])
    from launch.rundir import route_native_logs
    route_native_logs(run_path / "native.log")
    from launch.evaluate import evaluate_checkpoint
    record = evaluate_checkpoint(config, ckpt, run_path, episodes=args.episodes,
                                 epsilon=args.epsilon, video=args.video)
    print(json.dumps(record))
    return 0


def cmd_plot(args) -> int:
    for run in args.run_dirs:
        if not (Path(run) / "metrics.jsonl").is_file():
            raise UsageError(f"{run}: no metrics.jsonl (expected a run directory)")
    from launch.plot import plot_runs
    written = plot_runs([Path(r) for r in args.run_dirs], Path(args.out) if args.out else None)
    for path in written:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eosrl",
        description="DQN and C51 over Reverb, with spectral normalisation and Hessian "
                    "probes for studying the edge of stability.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train in one process (actor, learner, evaluator, in-process Reverb)",
                       description="Train an agent in one process around an in-process Reverb server.")
    p.add_argument("config", nargs="?", help="YAML config, e.g. configs/dqn_cartpole.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set agent.optimizer.lr=1e-3 (repeatable)")
    p.add_argument("--run-dir", help="run directory (default runs/<name>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a run's latest checkpoint or a checkpoint file",
                       description="Evaluate a checkpoint; prints one JSON line and appends an "
                                   "`eval` record to the run's metrics.")
    p.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--episodes", type=int, help="episodes (default run.eval_episodes)")
    p.add_argument("--epsilon", type=float, help="ε of the evaluation policy (default agent.epsilon_eval)")
    p.add_argument("--video", metavar="PATH.gif", help="save the first episode as an animated GIF")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("plot", help="plot sharpness, eigenvalues, loss and returns of runs",
                       description="Write PNG plots of one or more runs (several runs share each figure).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="directory for the PNGs (default RUN_DIR/plots of the first run)")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from agents.config import ConfigError
    from agents.checkpoint import CheckpointError
    from envs.factory import EnvError
    try:
        return args.func(args)
    except (UsageError, ConfigError, EnvError, CheckpointError, FileNotFoundError) as e:
        return _fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
