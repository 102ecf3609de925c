"""`eosrl train --seeds`: the seeds of one offline config as one vmapped program, each
seed's run directory written as if it had run alone.

Each seed is a lone offline run's parts (launch/train.py's `_Run`: its Builder, run
directory, metrics, LearnerLoop with its own Prober and warm-start vectors, evaluator
and checkpoints), with `run.seed` set to the seed. Only the updates are shared: between
two moments the host must act (a `train` record, a probe, an evaluation, a
checkpoint; the same updates for every seed, since only the seed differs) one
`SeedBatch` program (agents/seeds.py) makes every seed's updates, each drawing its
batches with its own key; then each seed's loop does what is due, in its own run
directory, as its lone run would at that update (`LearnerLoop.after_run`).

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
from typing import Any, Callable, Container, Dict, List, Mapping, Optional, Sequence, Set, Tuple

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


def runs_of_args(args: Any, load: Callable[[Path], Any],
                 delete_run: Callable[[Path], None]) -> Tuple[Dict[int, Any], Dict[int, Path], Set[int]]:
    """(configs, run dirs, seeds that resume) of `eosrl train CONFIG --seeds 0,1,2 [--run-dir
    DIR] [--overwrite]` (new runs in DIR_seed-<s>) or `eosrl train --seed-runs DIR ...`
    (each DIR holding its config.yaml; those with a checkpoint resume, the others start).
    `load(path)`: the checked config; `delete_run(path)`: what --overwrite does. Raises
    ValueError with the message for the user."""
    from eosrl.agents import checkpoint
    from eosrl.launch.resume import item_layout_problem
    configs: Dict[int, Any] = {}
    runs: Dict[int, Path] = {}
    resume: Set[int] = set()
    if args.seed_runs:
        if args.config or args.seeds is not None or args.run_dir:
            raise ValueError("--seed-runs: each run directory holds its config.yaml; give no CONFIG, --seeds "
                             "or --run-dir")
        for path in map(Path, args.seed_runs):
            run_dir = RunDir(path)
            if not run_dir.config.is_file():
                raise ValueError(f"--seed-runs {path}: no config.yaml there")
            config = load(run_dir.config)
            if config.run.seed in configs:
                raise ValueError(f"--seed-runs: {path} and {runs[config.run.seed]} have one run.seed, "
                                 f"{config.run.seed}")
            latest = checkpoint.latest(run_dir.checkpoints)
            if latest is not None:
                problem = item_layout_problem(checkpoint.read_meta(latest))
                if problem is not None:
                    raise ValueError(f"--seed-runs {path}: checkpoint {latest.name}: {problem}")
                resume.add(config.run.seed)
            elif run_dir.metrics.exists():
                raise ValueError(f"--seed-runs {path}: holds records but no checkpoint to resume from")
            configs[config.run.seed], runs[config.run.seed] = config, path
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


def check_together(configs: Dict[int, Any]) -> None:
    """Refuses configs that cannot run as one program: not offline, a seed that is not
    its config's `run.seed`, or configs that differ in more than the seed and the dataset."""
    first = next(iter(configs.values()))
    if first.regime.mode != "offline":
        raise ValueError("several seeds as one program: only offline runs (regime.mode: offline)")

    def rest(config):  # what must agree
        return dataclasses.replace(seed_config(config, 0),
                                   regime=dataclasses.replace(config.regime, dataset=first.regime.dataset))
    for seed, config in configs.items():
        if config.run.seed != seed:
            raise ValueError(f"seed {seed}: its config has run.seed={config.run.seed}")
        if rest(config) != rest(first):
            raise ValueError(f"seed {seed}: its config differs from seed {first.run.seed}'s in more than "
                             f"run.seed and regime.dataset; run them apart")


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
                f"{builders[0].config.regime.dataset}: {len(builders)} seeds each with their own data on the "
                f"device (regime.subset random, corruption or datasets of their own) need {needed / 1e9:.2f} GB, "
                f"more than the {free / 1e9:.2f} GB of {where}; run fewer seeds at once")


def train_seeds(config: Any, runs: Mapping[int, str | Path], resume: Container[int] = (),
                progress: bool = True, tensorboard: Optional[bool] = None) -> Dict[int, Dict[str, Any]]:
    """Runs (or, for the seeds in `resume`, resumes) the offline runs {seed: run dir} as
    one vmapped program; returns each seed's summary, as `train` would. `config`: one
    config for all (each seed's sets `run.seed`), or {seed: its config}, which may
    differ only in `run.seed` and `regime.dataset`. `tensorboard`: mirror the records to
    TensorBoard as `train` does (None: where TensorFlow can be imported; without it the
    run directories lack only `tb/`)."""
    start_time = time.time()
    if tensorboard is None:
        tensorboard = _importable("tensorflow")
    seeds = list(runs)
    configs = dict(config) if isinstance(config, dict) else {seed: seed_config(config, seed) for seed in seeds}
    if sorted(configs) != sorted(seeds):
        raise ValueError(f"configs for seeds {sorted(configs)}, run directories for {sorted(seeds)}")
    check_together(configs)
    config = configs[seeds[0]]
    if config.probe.enabled and config.probe.mode == "process":
        print("eosrl train probes inline, between updates (probe.mode: process is for eosrl launch)",
              file=sys.stderr)
    builders = [Builder(configs[seed]) for seed in seeds]
    own = own_datasets([configs[seed] for seed in seeds])
    check_fits(builders, own)
    loaded = [offline.load(b) for b in builders] if own else [offline.load(builders[0])] * len(builders)
    parts: List[_Run] = []
    try:
        for seed, builder, data in zip(seeds, builders, loaded):
            run_dir = RunDir(runs[seed]).create()
            if seed not in resume:
                save_config(builder.config, run_dir.config)
            parts.append(_Run(builder, run_dir, MetricsWriter(run_dir, tensorboard), _DeviceData(builder, data), seed in resume))
        for part, seed in zip(parts, seeds):
            part.start(seed in resume)
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
        return {seed: part.conclude(status, start_time) for seed, part, status in zip(seeds, parts, statuses)}
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
