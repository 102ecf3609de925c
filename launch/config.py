"""What a run is: the config sections of the run (`run:`, `distributed:`, `regime:`)
and the whole experiment, `Config` (env, agent, replay, run, probe, distributed,
regime), read from YAML with `--set` overrides, and every check on it in one place.

A YAML file in `configs/` loads into `Config`; `--set section.key=value` overrides
any field. Unknown keys, wrong types and impossible values raise `ConfigError` with
one line that names the key, before any process starts. Every loader (`load_config`:
the CLI and the study spec; `from_dict`: Ray's workers) ends in `validate`, which
checks the agent's sections (agents/config.py, `validate_agent`), the env (its kind,
game and preset exist: envs/factory.py), the spectral-norm layers against the network
(agents/layers.py) and the run's own fields. Reading a config imports no JAX
(tests/test_structure.py checks it). The agent's sections are agents/config.py's.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Literal, Optional

import yaml

from eosrl.agents.config import (AgentConfig, ConfigError, ProbeConfig, ReplayConfig, _positive, parse_subset,
                                 validate_agent)
from eosrl.agents.layers import selected_layers
from eosrl.envs.config import EnvConfig

__all__ = ["Config", "ConfigError", "DistributedConfig", "RegimeConfig", "RunConfig", "from_dict", "load_config",
           "parse_overrides", "read_yaml", "save_config", "to_dict", "validate"]


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
    """The checked Config of nested sections (`to_dict`'s output: how Ray's workers get it)."""
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
# Values that type-check but cannot run: every check, the agent's included.


def validate(c: Config) -> None:
    """Raises ConfigError naming the first field that cannot run; `load_config` and
    `from_dict` call it, so every loader does."""
    _positive("env.max_episode_frames", c.env.max_episode_frames)
    _validate_env(c)
    validate_agent(c.agent, c.replay, c.probe)
    selected_layers(c.agent, c.env.kind)  # the layers exist in the network the env gets
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


def _validate_env(c: Config) -> None:
    """The env's kind, game (or gymnasium id) and preset exist; imported here, not at the
    top, so that a config is read without gymnasium until it is checked."""
    from eosrl.envs.factory import EnvError, validate_env_config
    try:
        validate_env_config(c.env)
    except EnvError as e:
        raise ConfigError(str(e)) from None
