"""The `eosrl` command: train, evaluate, plot (and the roles of a distributed run).

Every subcommand checks its input first (config keys, env names, paths) and
fails with one line naming what is wrong, before any process or server starts.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import List, Optional

warnings.filterwarnings("ignore", category=DeprecationWarning)


class UsageError(Exception):
    """Bad input from the command line: reported as one line, exit code 2."""


def _fail(message: str) -> int:
    print(f"eosrl: error: {message}", file=sys.stderr)
    return 2


def _load(config_path: str, overrides: List[str], verify_dataset: str = "none"):
    """The checked config (`load_config` checks every field: launch/config.py, `validate`)
    and, for the offline regimes, its dataset on disk: made for this env, with these frames.
    `verify_dataset="open"` also checks every shard's checksum: the commands that create a
    run directory do, before creating it. (The dataset is a file, not a config value: a
    study's spec is read before an earlier stage has recorded it.)"""
    from eosrl.launch.config import load_config
    config = load_config(config_path, overrides)
    if config.regime.mode != "online":  # a dataset of another env is refused up front
        from eosrl.agents.dataset import DatasetReader
        from eosrl.envs.factory import env_spec
        reader = DatasetReader(config.regime.dataset, verify=verify_dataset)
        reader.check_env(config.env)
        spec = env_spec(config.env)
        reader.check_frames(spec.frame_shape, spec.obs_dtype)
    return config


def _run_config(args, command: str):
    """(config, run dir) for train/launch: a new run from CONFIG or --resume RUN_DIR."""
    from eosrl.launch.config import save_config
    from eosrl.launch.rundir import RunDir
    if args.resume:
        run_dir = RunDir(args.resume)
        if not run_dir.config.is_file():
            raise UsageError(f"--resume {args.resume}: no config.yaml there (is it a run directory?)")
        from eosrl.agents import checkpoint
        from eosrl.launch.resume import item_layout_problem
        latest = checkpoint.latest(run_dir.checkpoints)
        if latest is None:
            raise UsageError(f"--resume {args.resume}: no checkpoint in {run_dir.checkpoints}")
        problem = item_layout_problem(checkpoint.read_meta(latest))
        if problem is not None:
            raise UsageError(f"--resume {args.resume}: checkpoint {latest.name}: {problem}")
        config = _load(str(run_dir.config), args.set, verify_dataset="open")
        if args.set:  # what runs is what config.yaml says
            save_config(config, run_dir.config)
        return config, run_dir.path
    if not args.config:
        raise UsageError(f"{command}: give a CONFIG file or --resume RUN_DIR")
    config = _load(args.config, args.set, verify_dataset="open")
    path = Path(args.run_dir or Path("runs") / config.name)
    if RunDir(path).metrics.exists() and not args.overwrite:
        raise UsageError(f"run directory {path} already holds a run "
                         f"(use --resume {path}, --run-dir DIR or --overwrite)")
    if args.overwrite and path.exists():
        _delete_run(path)
    return config, path


def _delete_run(path: Path) -> None:
    """Deletes an old run for `--overwrite`, and nothing that is not one: the folder must
    hold a run's config.yaml and metrics.jsonl, and must not hold the working directory."""
    from eosrl.launch.rundir import RunDir
    if not path.is_dir() or not RunDir(path).is_run():
        raise UsageError(f"--overwrite: {path} is not an eosrl run directory (no config.yaml and "
                         f"metrics.jsonl there); refusing to delete it, choose another --run-dir")
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UsageError(f"--overwrite: {path} holds the working directory; refusing to delete it")
    files = [p for p in path.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    print(f"eosrl: --overwrite: deleting the run in {path} ({len(files)} files, {size / 2**20:.1f} MiB)",
          file=sys.stderr)
    import shutil
    shutil.rmtree(path)


def cmd_train(args) -> int:
    if args.seeds is not None or args.seed_runs:
        return _train_seeds(args)
    config, path = _run_config(args, "train")
    from eosrl.launch.rundir import route_native_logs
    route_native_logs(path / "native.log")
    from eosrl.launch.train import train
    from eosrl.launch.summary import print_summary
    summary = train(config, path, resume=bool(args.resume), progress=not args.no_progress)
    print_summary(summary)
    return 0 if summary["status"] == "completed" else 1


def _train_seeds(args) -> int:
    """`eosrl train CONFIG --seeds 0,1,2` or `eosrl train --seed-runs DIR ...`: offline
    seeds (and, with --seed-runs, step sizes) as one vmapped program (launch/train_seeds.py)."""
    from eosrl.launch.rundir import route_native_logs
    from eosrl.launch.summary import print_summary
    from eosrl.launch.train_seeds import runs_of_args, train_seeds
    if args.resume:
        raise UsageError("--resume: one run; resume seeds run together with --seed-runs RUN_DIR_seed-0 ...")
    try:
        configs, runs, resume = runs_of_args(args, lambda path: _load(str(path), args.set, verify_dataset="open"),
                                             _delete_run)
        route_native_logs(next(iter(runs.values())) / "native.log")
        summaries = train_seeds(configs, runs, resume, progress=not args.no_progress)
    except ValueError as error:  # arguments or configs that cannot run together
        raise UsageError(str(error)) from None
    for summary in summaries.values():
        print_summary(summary)
    return 0 if all(s["status"] == "completed" for s in summaries.values()) else 1


def cmd_launch(args) -> int:
    if args.actors is not None:
        args.set = list(args.set) + [f"distributed.num_actors={args.actors}"]
    if args.replay_port is not None and not 1024 <= args.replay_port <= 65535:
        raise UsageError(f"--replay-port {args.replay_port}: must be in 1024..65535")
    config, path = _run_config(args, "launch")
    from eosrl.launch.config import save_config
    from eosrl.launch.lifeline import stop_on_signals
    from eosrl.launch.rundir import RunDir, route_native_logs
    from eosrl.launch.summary import print_summary
    run_dir = RunDir(path).create()
    if not args.resume:
        save_config(config, run_dir.config)
    route_native_logs(run_dir.path / "native.log")
    common = dict(resume=bool(args.resume), progress=not args.no_progress, port=args.replay_port)
    with stop_on_signals():
        if args.launcher == "ray":
            from eosrl.launch.ray_launcher import launch_ray
            summary = launch_ray(config, run_dir.path, config.distributed.num_actors, address=args.ray_address,
                                 learner_gpus=args.learner_gpus, **common)
        else:
            from eosrl.launch.local import launch_local
            summary = launch_local(config, run_dir.path, config.distributed.num_actors, **common)
    print_summary(summary)
    return 0 if summary["status"] == "completed" else 1


def _role_setup(args):
    config = _load(args.config, args.set)
    run_dir = Path(args.run_dir) if args.run_dir else None
    if run_dir is not None:
        from eosrl.launch.rundir import RunDir, route_native_logs
        route_native_logs(RunDir(run_dir).logs / "native.log")
    return config, run_dir


def _address(value: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--replay {value!r}: expected HOST:PORT, e.g. localhost:8000")
    return value


def cmd_replay_server(args) -> int:
    config, run_dir = _role_setup(args)
    from eosrl.launch.roles import run_replay_server
    run_replay_server(config, args.port, run_dir)
    return 0


def cmd_actor(args) -> int:
    address = _address(args.replay)
    config, run_dir = _role_setup(args)
    num_actors = args.num_actors or config.distributed.num_actors
    if not 0 <= args.id < num_actors:
        raise UsageError(f"--id {args.id}: must be in 0..{num_actors - 1} (--num-actors {num_actors})")
    from eosrl.launch.roles import run_actor
    return run_actor(config, address, args.id, num_actors, args.steps, run_dir, args.start_step)


def cmd_learner(args) -> int:
    address = _address(args.replay)
    if not args.run_dir:
        raise UsageError("learner: --run-dir is required (metrics and checkpoints go there)")
    config, run_dir = _role_setup(args)
    from eosrl.launch.roles import run_learner
    return run_learner(config, address, run_dir)


def cmd_evaluator(args) -> int:
    address = _address(args.replay)
    config, run_dir = _role_setup(args)
    from eosrl.launch.roles import run_evaluator
    return run_evaluator(config, address, run_dir)


def cmd_prober(args) -> int:
    address = _address(args.replay)
    if not args.run_dir:
        raise UsageError("prober: --run-dir is required (probe records and the probe batch go there)")
    config, run_dir = _role_setup(args)
    if not (config.probe.enabled and config.probe.mode == "process"):
        raise UsageError("prober: the config must set probe.enabled=true and probe.mode=process "
                         "(the learner queues snapshots only then)")
    from eosrl.launch.prober import run_prober
    return run_prober(config, address, run_dir)


def _resolve_checkpoint(target: str):
    """(config path, checkpoint path, run dir or None) from a run dir or a checkpoint file."""
    from eosrl.agents import checkpoint
    from eosrl.launch.rundir import RunDir
    path = Path(target)
    if path.is_dir():
        run = RunDir(path)
        ckpt = checkpoint.latest(run.checkpoints)
        if not run.config.is_file():
            raise UsageError(f"{path}: no config.yaml (expected a run directory or a ckpt_*.npz file)")
        if ckpt is None:
            raise UsageError(f"{path}: no checkpoint in {run.checkpoints}")
        return run.config, ckpt, path
    if path.is_file() and path.suffix == ".npz":
        run = RunDir(path.parent.parent)  # checkpoints live in RUN_DIR/checkpoints/
        if not run.config.is_file():
            raise UsageError(f"{path}: no config.yaml in {run.path} (checkpoints live in RUN_DIR/checkpoints/)")
        return run.config, path, run.path
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
    from eosrl.launch.rundir import route_native_logs
    route_native_logs(run_path / "native.log")
    from eosrl.launch.evaluate import evaluate_checkpoint
    record = evaluate_checkpoint(config, ckpt, run_path, episodes=args.episodes,
                                 epsilon=args.epsilon, video=args.video)
    print(json.dumps(record))
    return 0


def cmd_plot(args) -> int:
    from eosrl.launch.rundir import RunDir
    for run in args.run_dirs:
        if not RunDir(run).metrics.is_file():
            raise UsageError(f"{run}: no metrics.jsonl (expected a run directory)")
    from eosrl.launch.plot import plot_runs
    written = plot_runs([Path(r) for r in args.run_dirs], Path(args.out) if args.out else None)
    for path in written:
        print(path)
    for figure, reason in getattr(written, "skipped", {}).items():
        print(f"skipped {figure}: {reason}")
    return 0


def cmd_dataset_info(args) -> int:
    from eosrl.agents.dataset import DatasetReader
    info = DatasetReader(args.path, verify="open").info()
    if args.json:
        print(json.dumps(info))
        return 0
    env = info.get("env", {})
    returns = info.get("returns", {})
    print(f"dataset   {args.path}")
    preset = f" (preset {env.get('preset')})" if env.get('kind') == 'atari' else ''
    print(f"env       {env.get('kind')} {env.get('id')}{preset}")
    print(f"size      {info['size_bytes'] / 2**20:.1f} MiB in {info.get('shards', '?')} shard(s)")
    print(f"contents  {info['transitions']} transitions, {info['episodes']} episodes "
          f"({info.get('complete_episodes', '?')} complete)")
    if returns.get("count"):
        print(f"returns   mean {returns['mean']:.2f}  std {returns['std']:.2f}  "
              f"min {returns['min']:.2f}  max {returns['max']:.2f}  (complete episodes)")
    return 0


def cmd_dataset_import(args) -> int:
    from eosrl.agents.dataset import import_dqn_replay
    checkpoints = None
    if args.checkpoints:
        try:
            checkpoints = [int(c) for c in args.checkpoints.split(",")]
        except ValueError:
            raise UsageError(f"--checkpoints {args.checkpoints!r}: expected comma-separated integers, e.g. 0,1,2")
    if not Path(args.src).is_dir():
        raise UsageError(f"{args.src}: not a directory of DQN Replay checkpoint files")
    result = import_dqn_replay(args.src, args.dst, checkpoints, env_id=args.game)
    print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eosrl",
        description="DQN and C51 over Reverb, with spectral normalisation and Hessian "
                    "probes for studying the edge of stability.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_run_commands(sub)
    _add_role_commands(sub)
    p = sub.add_parser("dataset", help="offline datasets: info, import of the DQN Replay Dataset",
                       description="Inspect or import offline-RL datasets (docs/dataset_format.md).")
    dsub = p.add_subparsers(dest="dataset_command", required=True, metavar="SUBCOMMAND")
    d = dsub.add_parser("info", help="size, episodes, return statistics and env of a dataset",
                        description="Print a dataset's size, episodes, return statistics and env.")
    d.add_argument("path")
    d.add_argument("--json", action="store_true", help="one JSON object instead of text")
    d.set_defaults(func=cmd_dataset_info)
    d = dsub.add_parser("import-dqn-replay", help="convert DQN Replay Dataset logs (Agarwal et al. 2020)",
                        description="Stream Dopamine replay logs ($store$_*_ckpt.N.gz) of one game "
                                    "and run into an eosrl dataset, one checkpoint at a time.")
    d.add_argument("src", help="directory with $store$_observation_ckpt.N.gz etc. (one game, one run)")
    d.add_argument("dst", help="output dataset directory")
    d.add_argument("--checkpoints", help="comma-separated checkpoint numbers (default: all found)")
    d.add_argument("--game", default="Pong", help="Atari game the logs belong to (default Pong)")
    d.set_defaults(func=cmd_dataset_import)

    from eosrl.launch.study import add_study_parser
    add_study_parser(sub)

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


def _add_run_commands(sub) -> None:
    """`train` and `launch`."""
    p = sub.add_parser("train", help="train in one process (actor, learner, evaluator, in-process Reverb)",
                       description="Train an agent in one process around an in-process Reverb server.")
    p.add_argument("config", nargs="?", help="YAML config, e.g. configs/dqn_cartpole.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set agent.optimizer.lr=1e-3 (repeatable)")
    p.add_argument("--run-dir", help="run directory (default runs/<name>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seeds", metavar="S,S,...",
                   help="offline only: run these seeds of CONFIG as one vmapped program, each in "
                        "RUN_DIR_seed-<s> as if it ran alone (docs/design.md, 'Seeds as one program')")
    p.add_argument("--seed-runs", nargs="+", metavar="RUN_DIR",
                   help="offline only: run these run directories (each holding its config.yaml, which may "
                        "differ only in run.seed, regime.dataset and agent.optimizer.lr) as one vmapped "
                        "program; those with a checkpoint resume from it, the others start (how a study runs "
                        "a cell, --vmap-seeds)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("launch", help="distributed run: replay server, actors, learner, evaluator as processes",
                       description="Start and supervise every role of a run as its own process "
                                   "(local) or as Ray actors (--launcher ray).")
    p.add_argument("config", nargs="?", help="YAML config")
    p.add_argument("--actors", type=int, help="actor processes (default distributed.num_actors)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--run-dir", help="run directory (default runs/<name>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint and replay")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--launcher", choices=["local", "ray"], default="local",
                   help="local subprocesses (default) or a Ray cluster")
    p.add_argument("--replay-port", type=int, metavar="PORT",
                   help="port of the replay server (default: a free one); it listens on every "
                        "interface without authentication, see README 'Security'")
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--learner-gpus", type=float, default=0.0, help="GPUs the Ray learner asks for")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_launch)



def _add_role_commands(sub) -> None:
    """The roles of a distributed run, each started alone with the replay server's address."""
    role_help = "run the {} role alone, connected to a replay server by address"
    p = sub.add_parser("replay-server", help="run the Reverb replay server role",
                       description="Serve the `replay` and `params` tables of CONFIG.")
    p.add_argument("config")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--run-dir", help="where table checkpoints go (RUN_DIR/replay)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_replay_server)
    for name, func in (("actor", cmd_actor), ("learner", cmd_learner), ("evaluator", cmd_evaluator),
                       ("prober", cmd_prober)):
        p = sub.add_parser(name, help=role_help.format(name), description=role_help.format(name) + ".")
        p.add_argument("config")
        p.add_argument("--replay", required=True, metavar="HOST:PORT", help="the replay server's address")
        p.add_argument("--run-dir", help="run directory for metrics (and the learner's checkpoints)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        if name == "actor":
            p.add_argument("--id", type=int, required=True, help="actor index (seed and Ape-X ε)")
            p.add_argument("--num-actors", type=int, help="actors in the run (default distributed.num_actors)")
            p.add_argument("--steps", type=int, help="env steps for this actor (default its share of run.total_env_steps)")
            p.add_argument("--start-step", type=int, default=0, help="env steps this actor already did (resume)")
        p.set_defaults(func=func)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from eosrl.launch.lifeline import watch_parent
    watch_parent(delay_s=4.0 if args.command == "replay-server" else 0.0)
    from eosrl.launch.config import ConfigError
    from eosrl.agents.checkpoint import CheckpointError
    from eosrl.envs.factory import EnvError
    from eosrl.agents.dataset import DatasetError
    try:
        return args.func(args)
    except (UsageError, ConfigError, EnvError, CheckpointError, FileNotFoundError, ConnectionError,
            DatasetError) as e:
        return _fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
