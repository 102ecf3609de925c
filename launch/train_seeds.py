"""`eosrl train --seeds`: the seeds of one offline config as one vmapped program, each
seed's run directory written as if it had run alone; `eosrl train --seed-runs DIR ...`:
the runs in DIR ..., whose configs may also differ in `regime.dataset` and the step
size `agent.optimizer.lr` (`check_together`), likewise.

Each run is a lone offline run's parts (launch/train.py's `_Run`: its Builder, run
directory, metrics, LearnerLoop with its own Prober and warm-start vectors, evaluator
and checkpoints), with `run.seed` set to the seed. Only the updates are shared: between
two moments the host must act (a `train` record, a probe, an evaluation, a
checkpoint; the same updates for every run, since neither the seed, the dataset nor
the step size moves them) one `SeedBatch` program (agents/seeds.py) makes every run's
updates, each drawing its batches with its own key, at its own lr; then each run's
loop does what is due, in its own run directory, as its lone run would at that update
(`LearnerLoop.after_run`; a probe's threshold from that run's lr).

Seeds that resume from checkpoints of different updates catch up one segment at a
time: each program runs the seeds furthest behind to the next host step, until all
are at one update. A seed whose loss goes non-finite stops there (`diverged`, as
alone); the others go on without it.

The dataset is loaded once for all seeds where the seed does not choose it; a
`random N` subset or corrupted transitions (both drawn with the seed), or a dataset
per seed (a study's offline runs of what each seed recorded), give each seed its own
copy on the device, S times the memory (`check_fits` counts them all).

No Reverb and no TensorFlow are imported on this path (tests/test_seeds.py); where
TensorFlow is installed, the records are mirrored to TensorBoard as a lone run's are.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable, Container, Dict, Hashable, List, Mapping, Optional, Sequence, Set, Tuple

from eosrl.agents import offline
from eosrl.launch.builder import Builder
from eosrl.agents.seeds import SeedBatch
from eosrl.launch.lifeline import stop_on_signals
from eosrl.launch.progress import progress_bar
from eosrl.launch.rundir import MetricsWriter, RunDir
from eosrl.launch.train import _DeviceData, _Run, save_config


def seed_config(config: Any, seed: int) -> Any:
    """`config` with `run.seed` set to `seed`."""
    return dataclasses.replace(config, run=dataclasses.replace(config.run, seed=int(seed)))


def seed_run_dir(run_dir: str | Path, seed: int) -> Path:
    """Seed `seed`'s run directory of `--run-dir RUN_DIR --seeds ...`: RUN_DIR_seed-<s>,
    the name a study gives a run's copy with that seed (launch/study/spec.py)."""
    return Path(f"{run_dir}_seed-{seed}")


def parse_seeds(text: str) -> List[int]:
    """`--seeds 0,1,2` (distinct integers >= 0)."""
    try:
        seeds = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds {text!r}: give distinct integers >= 0, comma-separated, e.g. 0,1,2")
    return seeds


def runs_of_args(args: Any, load: Callable[[Path], Any], delete_run: Callable[[Path], None]
                 ) -> Tuple[Dict[Hashable, Any], Dict[Hashable, Path], Set[Hashable]]:
    """(configs, run dirs, runs that resume), each keyed by run, of `eosrl train CONFIG --seeds
    0,1,2 [--run-dir DIR] [--overwrite]` (new runs in DIR_seed-<s>, keyed by seed) or `eosrl
    train --seed-runs DIR ...` (each DIR holding its config.yaml; those with a checkpoint
    resume, the others start; keyed by DIR: runs of one seed with different step sizes
    can run together). `load(path)`: the checked config; `delete_run(path)`: what
    --overwrite does. Raises ValueError with the message for the user."""
    from eosrl.agents import checkpoint
    from eosrl.launch.resume import item_layout_problem
    configs: Dict[Hashable, Any] = {}
    runs: Dict[Hashable, Path] = {}
    resume: Set[Hashable] = set()
    if args.seed_runs:
        if args.config or args.seeds is not None or args.run_dir:
            raise ValueError("--seed-runs: each run directory holds its config.yaml; give no CONFIG, --seeds "
                             "or --run-dir")
        given: Dict[Path, Path] = {}  # each directory as resolved -> as given
        for path in map(Path, args.seed_runs):
            if path.resolve() in given:
                raise ValueError(f"--seed-runs: {path} and {given[path.resolve()]} are one run directory")
            given[path.resolve()] = path
            run_dir = RunDir(path)
            if not run_dir.config.is_file():
                raise ValueError(f"--seed-runs {path}: no config.yaml there")
            config = load(run_dir.config)
            latest = checkpoint.latest(run_dir.checkpoints)
            if latest is not None:
                problem = item_layout_problem(checkpoint.read_meta(latest))
                if problem is not None:
                    raise ValueError(f"--seed-runs {path}: checkpoint {latest.name}: {problem}")
                resume.add(path)
            elif run_dir.metrics.exists():
                raise ValueError(f"--seed-runs {path}: holds records but no checkpoint to resume from")
            configs[path], runs[path] = config, path
    else:
        if not args.config:
            raise ValueError("train --seeds: give a CONFIG file")
        seeds = parse_seeds(args.seeds)
        config = load(Path(args.config))
        base = Path(args.run_dir or Path("runs") / config.name)
        for seed in seeds:
            path = seed_run_dir(base, seed)
            if RunDir(path).metrics.exists():
                if not args.overwrite:
                    raise ValueError(f"run directory {path} already holds a run (use --seed-runs to resume the "
                                     f"seeds, --run-dir DIR or --overwrite)")
                delete_run(path)
            configs[seed], runs[seed] = seed_config(config, seed), path
    if next(iter(configs.values())).regime.mode != "offline":
        raise ValueError("--seeds: seeds run as one program only offline (regime.mode: offline); run online "
                         "seeds one by one (or as a study's seeds)")
    return configs, runs, resume


def own_datasets(configs: Sequence[Any]) -> bool:
    """Whether each seed needs its own copy of the data on the device: the seed chooses
    the regime's transitions (a random subset, corruption), or the seeds read different
    datasets (a study's offline runs of the datasets each seed recorded)."""
    config = configs[0]
    return (str(config.regime.subset).split()[0] == "random" or config.regime.corruption > 0
            or len({str(c.regime.dataset) for c in configs}) > 1)


def shared_part(config: Any) -> Any:
    """What the configs of runs in one program must agree on: all but `run.seed`,
    `regime.dataset` and `agent.optimizer.lr` (blanked here), or all but the first two
    under a step-size rule, which computes each step size from lr within the update
    (agents/seeds.py)."""
    optimizer = config.agent.optimizer
    if optimizer.step_size_rule == "constant":
        optimizer = dataclasses.replace(optimizer, lr=0.0)
    return dataclasses.replace(seed_config(config, 0), regime=dataclasses.replace(config.regime, dataset=""),
                               agent=dataclasses.replace(config.agent, optimizer=optimizer))


def check_together(configs: Mapping[Hashable, Any]) -> None:
    """Refuses configs {run: config} that cannot run as one program: not offline, or
    configs that differ in more than `run.seed`, `regime.dataset` and `agent.optimizer.lr`
    (or in lr under a step-size rule)."""
    first_run, first = next(iter(configs.items()))
    if first.regime.mode != "offline":
        raise ValueError("several runs as one program: only offline runs (regime.mode: offline)")
    rule = first.agent.optimizer.step_size_rule
    for run, config in configs.items():
        optimizer = config.agent.optimizer
        if rule != "constant" and optimizer.step_size_rule == rule and optimizer.lr != first.agent.optimizer.lr:
            raise ValueError(f"run {run}: its agent.optimizer.lr differs from run {first_run}'s under "
                             f"agent.optimizer.step_size_rule {rule}, which sets each step size from lr; run "
                             f"one lr at a time")
        if shared_part(config) != shared_part(first):
            raise ValueError(f"run {run}: its config differs from run {first_run}'s in more than run.seed, "
                             f"regime.dataset and agent.optimizer.lr; run them apart")


def check_fits(builders: Sequence[Builder], own: bool) -> None:
    """Refuses, before anything starts, datasets that do not fit on the device together."""
    offline.check_fits(builders[0])
    if own and len(builders) > 1:
        from eosrl.agents.dataset import DatasetError, DatasetReader
        needed = 0
        for b in builders:
            reader = DatasetReader(b.config.regime.dataset, verify="none")
            needed += offline.estimate_bytes(b, reader, b.selection(reader))
        free, where = offline.available_bytes()
        if needed > free:
            raise DatasetError(
                f"{builders[0].config.regime.dataset}: {len(builders)} runs each with their own data on the "
                f"device (regime.subset random, corruption or datasets of their own) need {needed / 1e9:.2f} GB, "
                f"more than the {free / 1e9:.2f} GB of {where}; run fewer at once")


def train_seeds(config: Any, runs: Mapping[Hashable, str | Path], resume: Container[Hashable] = (),
                progress: bool = True, tensorboard: Optional[bool] = None) -> Dict[Hashable, Dict[str, Any]]:
    """Runs (or, for the runs in `resume`, resumes) the offline runs {run: run dir} as one
    vmapped program; returns each run's summary, as `train` would. `config`: one config
    for all, the runs keyed by seed (each one's config sets `run.seed` to its key), or
    {run: its config}, which may differ only in `run.seed`, `regime.dataset` and
    `agent.optimizer.lr` (`check_together`). `tensorboard`: mirror the records to
    TensorBoard as `train` does (None: where TensorFlow can be imported; without it the
    run directories lack only `tb/`)."""
    start_time = time.time()
    if tensorboard is None:
        tensorboard = _importable("tensorflow")
    keys: List[Any] = list(runs)  # seeds where one config serves all
    configs = dict(config) if isinstance(config, dict) else {seed: seed_config(config, seed) for seed in keys}
    if set(configs) != set(keys):
        raise ValueError(f"configs for runs {list(configs)}, run directories for {keys}")
    check_together(configs)
    config = configs[keys[0]]
    if config.probe.enabled and config.probe.mode == "process":
        print("eosrl train probes inline, between updates (probe.mode: process is for eosrl launch)",
              file=sys.stderr)
    builders = [Builder(configs[key]) for key in keys]
    own = own_datasets([configs[key] for key in keys])
    check_fits(builders, own)
    loaded = [offline.load(b) for b in builders] if own else [offline.load(builders[0])] * len(builders)
    parts: List[_Run] = []
    try:
        for key, builder, data in zip(keys, builders, loaded):
            run_dir = RunDir(runs[key]).create()
            if key not in resume:
                save_config(builder.config, run_dir.config)
            parts.append(_Run(builder, run_dir, MetricsWriter(run_dir, tensorboard), _DeviceData(builder, data),
                              key in resume))
        for part, key in zip(parts, keys):
            part.start(key in resume)
        batch = SeedBatch([part.loop.learner for part in parts],
                          [data for data, _ in loaded] if own else loaded[0][0])
        statuses = ["failed"] * len(parts)  # what the final checkpoints say if an exception ends the runs
        with stop_on_signals() as signals:
            try:
                _updates(parts, batch, builders[0].schedule().update_budget(), progress, statuses)
            except BaseException as error:
                if not signals.stopped(error):
                    raise
                for i, part in enumerate(parts):
                    if statuses[i] == "failed":
                        statuses[i] = "interrupted"
                        part.metrics.write("event", part.loop.learner.step, env_steps=part.env_steps,
                                           event="interrupted")
            finally:
                statuses = [part.finish(status) for part, status in zip(parts, statuses)]
        return {key: part.conclude(status, start_time) for key, part, status in zip(keys, parts, statuses)}
    finally:
        for part in parts:
            part.metrics.close()


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _updates(parts: List[_Run], batch: SeedBatch, total: int, progress: bool, statuses: List[str]) -> None:
    """The fused updates of every seed until `total`, vmapped; sets each seed's status in
    `statuses` when it ends (`diverged` at once, so an interruption later keeps it)."""
    loops = [part.loop for part in parts]
    for part in parts:
        assert isinstance(part.data, _DeviceData)
        part.loop.start_on_device(part.data.data)  # the dataset of probe.dataset_every
    live = list(range(len(loops)))
    bar = progress_bar(total, min(loop.learner.step for loop in loops), "update") if progress else None
    try:
        while live:
            low = min(loops[i].learner.step for i in live)
            if low >= total:
                break
            members = [i for i in live if loops[i].learner.step == low]  # those furthest behind
            end = loops[members[0]].next_host_step(low, total)
            losses = [loops[i].wants_losses(low, end) for i in members]  # each seed's own trace windows
            for i, window in zip(members, batch.run(end - low, members, losses)):
                if not loops[i].after_run(window):
                    statuses[i] = "diverged"
                    live.remove(i)
            if bar is not None and live:
                bar.update(min(loops[i].learner.step for i in live) - bar.n)
    finally:
        if bar is not None:
            bar.close()
    for i in live:
        statuses[i] = "completed"


__all__ = ["check_together", "own_datasets", "parse_seeds", "runs_of_args", "seed_config", "seed_run_dir",
           "train_seeds"]
