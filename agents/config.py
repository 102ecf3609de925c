"""Every config field of an eosrl experiment, typed and documented in one place.

A YAML file in `configs/` loads into `Config`; `--set section.key=value`
overrides any field. Unknown keys, wrong types and impossible values raise
`ConfigError` with one line that names the key, before any process starts.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Literal, Optional

import yaml

from eosrl.agents import kinds
from eosrl.envs.config import EnvConfig


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key."""


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "rmsprop", "adam"] = "adam"
    """`sgd` (optionally heavy-ball or Nesterov momentum), `rmsprop` or `adam`."""
    lr: float = 1e-3
    """Learning rate (the initial value when `lr_schedule` is not constant); with a
    `step_size_rule`, the cap on the rule's η_t."""
    lr_schedule: Literal["constant", "linear"] = "constant"
    """`constant` or `linear` (from `lr` to `lr_end` over `lr_decay_updates` updates)."""
    lr_end: float = 0.0
    """Final learning rate of the `linear` schedule."""
    lr_decay_updates: int = 0
    """Updates over which the `linear` schedule decays."""
    momentum: float = 0.0
    """SGD momentum β (heavy ball v ← βv + g); 0 is plain SGD."""
    nesterov: bool = False
    """Use Nesterov momentum with SGD."""
    decay: float = 0.95
    """RMSProp second-moment decay ρ."""
    centered: bool = False
    """Centred RMSProp (divide by the variance instead of the second moment)."""
    b1: float = 0.9
    """Adam first-moment decay β₁."""
    b2: float = 0.999
    """Adam second-moment decay β₂."""
    eps: float = 1e-8
    """Adam / RMSProp ε added to the denominator."""
    max_grad_norm: float = 0.0
    """Clip gradients to this global norm before the optimiser; 0 disables clipping."""
    step_size_rule: Literal["constant", "drift_adjusted", "corridor"] = "constant"
    """How the step size η_t of each update is chosen (agents/step_sizes.py; `sgd` only):
    `constant` (`lr` and its schedule); `drift_adjusted` (DAL of Rosca et al., 2023:
    η_t = min(2 / (‖Hg‖/‖g‖)^p, lr), one Hessian-vector product per update); `corridor`
    (Dherin & Rosca, 2024, a Polyak step: η_t = min(c·L/‖g‖², lr)). Probes compare λ₁
    with the threshold of the last η_t."""
    dal_power: float = 1.0
    """p of `drift_adjusted`: larger p shrinks steps more where the drift ‖Hg‖/‖g‖ > 1
    (the paper's trade-off between stability and progress; p = 0 gives η_t = min(2, lr))."""
    corridor_scale: float = 1.0
    """c of `corridor` (c = 1 is Polyak's step with the loss's lower bound 0)."""


@dataclass
class SpectralNormConfig:
    layers: str = "none"
    """Layers to normalise: negative indices from the output as in Gogianu et al. (2021)
    (`"-2"` is the penultimate layer, `"-2,-3"`), layer names (`"dense_0"`), `"all"` or `"none"`."""
    mode: Literal["divide", "clip", "log"] = "divide"
    """`divide` (W/σ), `clip` (W/max(1, σ): only shrink) or `log` (measure σ, leave W as it is)."""
    power_iterations: int = 1
    """Power-iteration steps per learner update; the vectors persist in the network state."""
    conv: Literal["reshape", "operator"] = "reshape"
    """σ of a convolution: `reshape` (norm of the kernel reshaped to a matrix, the usual
    approximation) or `operator` (true operator norm of the convolution for its input shape)."""
    scale_lr: bool = False
    """Step-size ablation of the paper: divide each selected layer's learning rate (its
    optimiser update) by max(1, σ); use with mode `log`, so the function is unchanged
    and only the step size differs."""


@dataclass
class AgentConfig:
    kind: str = "dqn"
    """The agent, a name in the registry of agents/kinds.py: `dqn` (Huber TD loss), `c51`
    (categorical cross-entropy loss) or `qrdqn` (quantile Huber loss). Its fields below
    (`huber_delta`; `num_atoms`, `v_min`, `v_max`; `num_quantiles`) name it."""
    network: Literal["auto", "mlp", "minatar_cnn", "nature_cnn"] = "auto"
    """`mlp`, `minatar_cnn`, `nature_cnn`, or `auto` (chosen from the env kind)."""
    hidden_sizes: List[int] = field(default_factory=lambda: [64, 64])
    """Hidden layer widths of the `mlp` network."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The optimiser and its hyperparameters."""
    discount: float = 0.99
    """Per-step discount γ."""
    n_step: int = 1
    """Steps summed in the bootstrapped return."""
    double_q: bool = False
    """Select the bootstrap action with the online network (double DQN / double C51)."""
    huber_delta: float = 1.0
    """δ of the DQN Huber loss (quadratic inside |x| ≤ δ)."""
    num_atoms: int = 51
    """C51 support size."""
    v_min: float = -10.0
    """Lowest C51 atom."""
    v_max: float = 10.0
    """Highest C51 atom."""
    num_quantiles: int = 200
    """QR-DQN quantiles per action, N (Dabney et al., 2018 used 200 on Atari; the loss, a
    sum over them, and its sharpness grow with N: agents/qrdqn.py)."""
    target_update_period: int = 100
    """Learner updates between copies of the online parameters into `target_params`."""
    epsilon_start: float = 1.0
    """ε of the ε-greedy behaviour policy at the first env step."""
    epsilon_end: float = 0.01
    """ε after `epsilon_decay_steps` env steps (linear schedule)."""
    epsilon_decay_steps: int = 10_000
    """Env steps over which ε decays linearly."""
    epsilon_eval: float = 0.001
    """ε used by the evaluator."""
    spectral_norm: SpectralNormConfig = field(default_factory=SpectralNormConfig)
    """Spectral normalisation per layer (none by default)."""
    gradient_penalty: float = 0.0
    """λ of λ·‖∇_θ L_TD‖² added to the TD loss: implicit gradient regularisation made
    explicit (Barrett & Dherin, 2021); 0 disables it. Costs a second backward pass."""
    geometric_complexity_penalty: float = 0.0
    """λ of λ·GC added to the TD loss, GC = mean over the batch of ‖∂q(x)/∂x‖²_F of the
    Q-network (Dherin et al., 2022; the quantity `probe.geometric_complexity_every`
    reports); 0 disables it. Costs one backward pass per action, each slow on CPU (XLA's
    convolution input gradient), hence `geometric_complexity_rows`."""
    geometric_complexity_rows: int = 32
    """Rows of each batch the penalty's GC is computed on (the first ones: batch rows are
    drawn uniformly, so this is an unbiased estimate of the batch's GC); 0 = the whole batch."""


@dataclass
class ReplayConfig:
    capacity: int = 50_000
    """Transitions held in the Reverb `replay` table (FIFO removal beyond this)."""
    min_size: int = 1_000
    """Transitions in replay before the learner starts."""
    batch_size: int = 64
    """Transitions per learner update."""
    update_period: int = 1
    """Env steps per learner update (samples per insert = batch_size / update_period)."""
    record_to: str = ""
    """Record every transition the actor collects to an on-disk dataset at this path
    (docs/dataset_format.md); empty records nothing."""
    checkpoint: bool = True
    """Checkpoint the replay table with each learner checkpoint (Reverb checkpointer), so a
    resumed run continues with its data. Turn off for Atari-sized buffers (gigabytes per copy)."""


@dataclass
class RunConfig:
    total_env_steps: int = 50_000
    """Env steps collected by the behaviour policy over the whole run: > 0 in the `online`
    and `offline_to_online` regimes, unused (any value >= 0) in `offline`."""
    total_updates: int = 0
    """Learner updates of an `offline` regime (> 0 there; unused otherwise). In offline runs
    eval_every, checkpoint_every and log_every count learner updates, since no env steps are taken."""
    seed: int = 0
    """Seed of the envs, network initialisation, ε-greedy exploration, evaluation episodes, the
    dataset subset and corruption, and, in `eosrl train` offline, of every batch (drawn on the
    device with the learner's key): two such runs with one seed are bit-identical. Not of Reverb
    replay sampling (online, offline-to-online, `eosrl launch`): its selectors draw from an
    unseeded generator in C++, so two runs with one seed match until the first sampled batch
    and differ after it (README, Reproducibility)."""
    eval_every: int = 10_000
    """Env steps between evaluations (0 disables periodic evaluation; a completed run always
    gets a final one). Like `checkpoint_every` and `log_every`, it is counted in learner updates,
    one per `replay.update_period` env steps, so it falls on the same updates in one process,
    distributed, and after a resume."""
    eval_episodes: int = 10
    """Episodes per evaluation."""
    checkpoint_every: int = 10_000
    """Env steps between checkpoints (a final one is always written); in updates, as eval_every."""
    keep_checkpoints: int = 3
    """Most recent checkpoints kept on disk."""
    log_every: int = 1_000
    """Env steps between `train` records in metrics.jsonl; in updates, as eval_every."""


@dataclass
class ProbeConfig:
    enabled: bool = False
    """Measure Hessian eigenvalues of the TD loss during training."""
    mode: Literal["inline", "process"] = "inline"
    """`inline`: the learner probes between updates; `process`: `eosrl launch` runs a prober process that
    measures snapshots the learner publishes, while it keeps learning (`eosrl train` always probes inline)."""
    every: int = 100
    """Learner updates between probes."""
    full_every: int = 0
    """Learner updates between full probes (a multiple of `every`; 0: every probe is full). A full probe
    measures the top `num_eigs` eigenvalues, `smallest`, the unscaled λ₁ and the batch sharpness; the probes
    between them measure λ₁ only (k = 1, warm-started from the last probe's top eigenvector, stopped on the
    residual), for a few HVPs: records with `full: false` and one eigenvalue (docs/design.md, Probes)."""
    num_eigs: int = 5
    """Top eigenvalues reported (sorted by value, largest first)."""
    method: Literal["lobpcg", "lanczos"] = "lobpcg"
    """`lobpcg`: block solver started from the previous probe's eigenvectors, stopped at `tolerance`;
    `lanczos`: a cold start each probe, `iterations` Lanczos steps with full reorthogonalisation."""
    tolerance: float = 1e-3
    """An eigenpair counts as converged when ‖Hv − λv‖ ≤ tolerance·|λ₁|; `lobpcg` stops once all are."""
    iterations: int = 30
    """Most solver iterations per probe: block iterations (`lobpcg`) or Lanczos steps (`lanczos`)."""
    smallest: bool = False
    """Also estimate the smallest eigenvalue (negative curvature)."""
    batch: Literal["fixed", "fresh"] = "fixed"
    """`fixed`: one batch drawn when learning starts and reused (kept with the run); `fresh`: a new batch each probe."""
    batch_size: int = 512
    """Transitions in the probe batch, independent of the training batch."""
    max_queued: int = 4
    """`process` mode: snapshots that may wait for the prober (the one being measured included); when
    that many wait, the learner skips the next one (it never waits) and writes a `probe_skipped` event."""
    trace_every: int = 0
    """Learner updates between Hutchinson estimates of tr(H) (a multiple of `every`; 0: never)."""
    hutchinson_samples: int = 10
    """Rademacher probes of Hutchinson's estimator of the Hessian trace."""
    geometric_complexity_every: int = 0
    """Learner updates between measures of the Q-network's geometric complexity (a multiple of `every`; 0: never)."""
    batch_sharpness_batches: int = 0
    """Fresh batches of the training batch size (`replay.batch_size`) each probe also draws to measure the
    batch sharpness E_B[g_Bᵀ H_B g_B / ‖g_B‖²] and the mean λ_max of the batch Hessians (Andreyev &
    Beneventano, 2024), in the step's geometry D^½ H_B D^½ like λ₁; each batch costs a gradient, 1 HVP and
    a one-vector eigensolve (0: off)."""


@dataclass
class DistributedConfig:
    num_actors: int = 2
    """Actor processes started by `eosrl launch` (`--actors` overrides it)."""
    actor_epsilon: Literal["schedule", "apex"] = "schedule"
    """`schedule`: every actor's env follows agent.epsilon_* over its own env steps; `apex`:
    env i of N (all actors' envs: num_actors × envs_per_actor) keeps the fixed
    ε_i = apex_epsilon^(1 + apex_alpha·i/(N−1)) of Ape-X (Horgan et al., 2018)."""
    apex_epsilon: float = 0.4
    """Base ε of the Ape-X per-actor exploration."""
    apex_alpha: float = 7.0
    """Exponent spread of the Ape-X per-actor exploration."""
    envs_per_actor: int = 1
    """Envs each actor process steps together, with one batched policy call per step of
    all of them; env i of actor a is seeded, and explores (`apex`), as the single-env
    actor a·envs_per_actor + i would (`eosrl train` always steps one env)."""
    param_refresh_steps: int = 200
    """Env steps (of all an actor's envs) between an actor's reads of the `params` table."""
    publish_every: int = 100
    """Learner updates between writes of the parameters to the `params` table."""
    max_actor_restarts: int = 3
    """Restarts either launcher (local or Ray) grants each actor, and the prober, that dies before giving up on it."""
    error_buffer: float = 0.0
    """Slack of the SampleToInsertRatio limiter in samples (0: ten updates' worth, at least 100)."""


@dataclass
class RegimeConfig:
    mode: Literal["online", "offline", "offline_to_online"] = "online"
    """`online` (actors collect), `offline` (learn from `dataset` only) or `offline_to_online`
    (replay starts with `dataset`, then actors add data)."""
    dataset: str = ""
    """Path of a recorded or imported dataset (offline regimes)."""
    subset: str = "all"
    """Transitions of the dataset to use: `all`, `first N`, `last N` or `random N` (seeded by run.seed)."""
    corruption: float = 0.0
    """Fraction of the used transitions whose `corruption_field` is replaced at random."""
    corruption_field: Literal["actions", "rewards"] = "actions"
    """`actions` (uniform random action) or `rewards` (drawn from the dataset's reward values)."""


@dataclass
class Config:
    name: str = "run"
    """Run name; the default run directory is runs/<name>."""
    env: EnvConfig = field(default_factory=EnvConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    run: RunConfig = field(default_factory=RunConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    regime: RegimeConfig = field(default_factory=RegimeConfig)


RUN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


# ----------------------------------------------------------------------------
# Building a Config from nested dicts, with typed checks.


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {getattr(tp, '__name__', tp)} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:  # the allowed values, declared once on the field
        valid = typing.get_args(tp)
        if value not in valid:
            raise ConfigError(f"{key}: unknown value {value!r} (valid: {', '.join(map(str, valid))})")
        return value
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin in (list, List):
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # `--set agent.hidden_sizes=64,64`
            value = [yaml.safe_load(v) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown key '{prefix}{key}' (valid keys: {', '.join(names)})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def from_dict(data: dict) -> Config:
    if not isinstance(data, dict):
        raise ConfigError("config: expected a mapping of sections (env, agent, replay, run)")
    config = _build(Config, data)
    validate(config)
    return config


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    cls = Config
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"unknown key '{dotted}' ({where} has: {', '.join(names)})")
        if i == len(parts) - 1:
            node[part] = value
            return
        cls = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown key '{dotted}' ('{'.'.join(parts[:i + 1])}' is not a section)")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: expected a mapping")


def parse_overrides(overrides: List[str]) -> List[tuple]:
    pairs = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. agent.optimizer.lr=1e-3")
        key, raw = item.split("=", 1)
        pairs.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
    return pairs


# ----------------------------------------------------------------------------
# Reading a user's YAML file (configs, study files): PyYAML's SafeLoader reads an
# empty file as None and keeps the last of two equal keys, so a blank file or a
# `kind:` given twice would run something else than written, without a word.


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, first: int, second: int):
        super().__init__(f"duplicate key '{key}' on lines {first} and {second} "
                         f"(YAML would keep only the last; remove one)")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping, at any depth."""

    def construct_document(self, node):
        _check_duplicates(self, node, "", set())
        return super().construct_document(node)


def _check_duplicates(loader: yaml.SafeLoader, node: yaml.Node, where: str, seen: set) -> None:
    """Raises _DuplicateKey for the first key that appears twice in a mapping under `node`;
    `where` is the node's dotted path (`agent`, `stages[0].runs[1].set`)."""
    if id(node) in seen:  # an alias: checked where its anchor stands (and no cycles)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(loader, item, f"{where}[{i}]", seen)
    elif isinstance(node, yaml.MappingNode):
        lines: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then a key: an override by design
                _check_duplicates(loader, value_node, where, seen)
                continue
            key = loader.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
            dotted = f"{where}.{key}" if where else str(key)
            line = key_node.start_mark.line + 1
            if key is not None and key in lines:
                raise _DuplicateKey(dotted, lines[key], line)
            if key is not None:
                lines[key] = line
            _check_duplicates(loader, value_node, dotted, seen)


def read_yaml(path: Path, what: str = "config", error: type = ConfigError) -> Any:
    """The YAML document of `path` (a file that exists). An empty file (or one of only
    comments), invalid YAML or a duplicate key raise `error` with one line naming the file."""
    loader = _StrictLoader(path.read_text())
    try:
        node = loader.get_single_node()
        if node is None:
            raise error(f"{path}: the {what} file is empty (nothing but comments or blank lines)")
        return loader.construct_document(node)
    except _DuplicateKey as e:
        raise error(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    finally:
        loader.dispose()


def load_config(path: str | Path, overrides: Optional[List[str]] = None) -> Config:
    """Reads a YAML config, applies `--set` overrides, and validates the result."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (env, agent, replay, run)")
    for key, value in parse_overrides(overrides or []):
        _set_path(data, key, value)
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


# ----------------------------------------------------------------------------
# Values that type-check but cannot run.


def _positive(key: str, value, allow_zero: bool = False) -> None:
    # `not value >= 0` also catches NaN, which passes every ordered comparison's negation.
    if not value >= 0 or (value == 0 and not allow_zero) or value == math.inf:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: must be {bound}, got {value}")


def _validate_probe(p: ProbeConfig, capacity: int) -> None:
    _positive("probe.every", p.every)
    _positive("probe.num_eigs", p.num_eigs)
    _positive("probe.batch_size", p.batch_size)
    _positive("probe.hutchinson_samples", p.hutchinson_samples)
    _positive("probe.iterations", p.iterations)
    _positive("probe.max_queued", p.max_queued)
    _positive("probe.batch_sharpness_batches", p.batch_sharpness_batches, allow_zero=True)
    if not 0.0 < p.tolerance < 1.0:
        raise ConfigError(f"probe.tolerance: must be in (0, 1), got {p.tolerance}")
    if p.method == "lanczos" and p.iterations < p.num_eigs:
        raise ConfigError(f"probe.iterations: {p.iterations} is fewer than probe.num_eigs {p.num_eigs}")
    _positive("probe.full_every", p.full_every, allow_zero=True)
    if p.full_every % p.every:
        raise ConfigError(f"probe.full_every: {p.full_every} is not a multiple of probe.every {p.every} "
                          "(0: every probe is full)")
    for name in ("trace_every", "geometric_complexity_every"):
        every = getattr(p, name)
        _positive(f"probe.{name}", every, allow_zero=True)
        if every % p.every:
            raise ConfigError(f"probe.{name}: {every} is not a multiple of probe.every {p.every} (0: never)")
    if p.enabled and p.batch_size > capacity:
        raise ConfigError(f"probe.batch_size: {p.batch_size} is larger than replay.capacity {capacity}")


def parse_subset(subset: str) -> tuple:
    """("all", None) or (mode, N) from `regime.subset`, e.g. "first 100000"."""
    parts = str(subset).split()
    if parts == ["all"]:
        return "all", None
    if len(parts) == 2 and parts[0] in ("first", "last", "random") and parts[1].isdigit() and int(parts[1]) > 0:
        return parts[0], int(parts[1])
    raise ConfigError(f"regime.subset: {subset!r} is not one of 'all', 'first N', 'last N', 'random N'")


def _validate_optimizer(o: OptimizerConfig) -> None:
    _positive("agent.optimizer.lr", o.lr)
    _positive("agent.optimizer.lr_end", o.lr_end, allow_zero=True)
    if o.lr_schedule == "linear":
        _positive("agent.optimizer.lr_decay_updates", o.lr_decay_updates)
    for key in ("momentum", "decay", "b1", "b2"):
        value = getattr(o, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"agent.optimizer.{key}: must be in [0, 1), got {value}")
    if o.nesterov and o.momentum == 0:
        raise ConfigError("agent.optimizer.nesterov: needs agent.optimizer.momentum > 0")
    _positive("agent.optimizer.eps", o.eps)
    _positive("agent.optimizer.max_grad_norm", o.max_grad_norm, allow_zero=True)
    if o.step_size_rule != "constant":
        if o.name != "sgd":
            raise ConfigError(f"agent.optimizer.step_size_rule: {o.step_size_rule} is a rule for sgd "
                              f"(with or without momentum), not {o.name}")
        if o.lr_schedule != "constant":
            raise ConfigError(f"agent.optimizer.lr_schedule: must be constant with step_size_rule "
                              f"{o.step_size_rule} (lr is the rule's cap)")
    _positive("agent.optimizer.dal_power", o.dal_power, allow_zero=True)
    _positive("agent.optimizer.corridor_scale", o.corridor_scale)


def validate(c: Config) -> None:
    _positive("env.max_episode_frames", c.env.max_episode_frames)
    a = c.agent
    _validate_optimizer(a.optimizer)
    _positive("agent.gradient_penalty", a.gradient_penalty, allow_zero=True)
    _positive("agent.geometric_complexity_penalty", a.geometric_complexity_penalty, allow_zero=True)
    _positive("agent.geometric_complexity_rows", a.geometric_complexity_rows, allow_zero=True)
    if not 0.0 <= a.discount <= 1.0:
        raise ConfigError(f"agent.discount: must be in [0, 1], got {a.discount}")
    _positive("agent.n_step", a.n_step)
    if a.kind not in kinds.REGISTRY:
        raise ConfigError(f"agent.kind: unknown kind {a.kind!r} (registered: {', '.join(kinds.REGISTRY)})")
    _positive("agent.huber_delta", a.huber_delta)
    _positive("agent.num_quantiles", a.num_quantiles)
    if a.num_atoms < 2:
        raise ConfigError(f"agent.num_atoms: must be >= 2, got {a.num_atoms}")
    if a.v_min >= a.v_max:
        raise ConfigError(f"agent.v_min: must be below agent.v_max ({a.v_min} >= {a.v_max})")
    if not a.hidden_sizes or any(h <= 0 for h in a.hidden_sizes):
        raise ConfigError(f"agent.hidden_sizes: must be a non-empty list of positive widths, got {a.hidden_sizes}")
    _positive("agent.target_update_period", a.target_update_period)
    for key in ("epsilon_start", "epsilon_end", "epsilon_eval"):
        value = getattr(a, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"agent.{key}: must be in [0, 1], got {value}")
    _positive("agent.epsilon_decay_steps", a.epsilon_decay_steps, allow_zero=True)
    sn = a.spectral_norm
    _positive("agent.spectral_norm.power_iterations", sn.power_iterations)
    r = c.replay
    _positive("replay.capacity", r.capacity)
    _positive("replay.min_size", r.min_size)
    _positive("replay.batch_size", r.batch_size)
    _positive("replay.update_period", r.update_period)
    if r.batch_size > r.min_size:
        raise ConfigError(f"replay.batch_size: {r.batch_size} is larger than replay.min_size {r.min_size}")
    if r.min_size > r.capacity:
        raise ConfigError(f"replay.min_size: {r.min_size} is larger than replay.capacity {r.capacity}")
    u = c.run
    # The budget the regime runs on must be positive: with none the run would "complete" at
    # once, untrained. Offline runs take no env steps: their total_env_steps is unused.
    if c.regime.mode != "offline" and not u.total_env_steps > 0:
        raise ConfigError(f"run.total_env_steps: must be > 0 (regime.mode {c.regime.mode} runs that many "
                          f"env steps), got {u.total_env_steps}")
    _positive("run.total_env_steps", u.total_env_steps, allow_zero=True)
    _positive("run.eval_every", u.eval_every, allow_zero=True)
    _positive("run.eval_episodes", u.eval_episodes)
    _positive("run.checkpoint_every", u.checkpoint_every)
    _positive("run.keep_checkpoints", u.keep_checkpoints)
    _positive("run.log_every", u.log_every)
    _validate_probe(c.probe, r.capacity)
    d = c.distributed
    _positive("distributed.num_actors", d.num_actors)
    _positive("distributed.envs_per_actor", d.envs_per_actor)
    _positive("distributed.param_refresh_steps", d.param_refresh_steps)
    _positive("distributed.publish_every", d.publish_every)
    _positive("distributed.max_actor_restarts", d.max_actor_restarts, allow_zero=True)
    _positive("distributed.error_buffer", d.error_buffer, allow_zero=True)
    if not 0.0 < d.apex_epsilon < 1.0:
        raise ConfigError(f"distributed.apex_epsilon: must be in (0, 1), got {d.apex_epsilon}")
    g = c.regime
    if not 0.0 <= g.corruption <= 1.0:
        raise ConfigError(f"regime.corruption: must be in [0, 1], got {g.corruption}")
    parse_subset(g.subset)
    if g.mode != "online" and not g.dataset:
        raise ConfigError(f"regime.dataset: regime.mode {g.mode} needs the path of a dataset")
    if g.mode == "offline" and not u.total_updates > 0:
        raise ConfigError(f"run.total_updates: must be > 0 (the learner updates of an offline run), "
                          f"got {u.total_updates}")
    if not RUN_NAME.fullmatch(c.name) or c.name in (".", ".."):
        # The name becomes runs/<name>, which --overwrite may delete: it must stay inside runs/.
        raise ConfigError(f"name: must be letters, digits, '_', '-' or '.' (not '.' or '..'), got {c.name!r}")
