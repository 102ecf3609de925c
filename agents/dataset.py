"""Offline-RL datasets on disk: the format, its streaming writer and reader, subsets and
corruption for data-regime experiments, and an importer for the DQN Replay Dataset.

A dataset is a directory with `meta.json` and shards `shard_00000.npz`, ... holding the
steps of episodes as single frames (a stacked observation is rebuilt from consecutive
rows, as in replay). docs/dataset_format.md specifies the layout; in short, row i holds
the newest frame of an observation and the action, raw reward and terminal/truncation
flags of the step taken from it; an episode starts with `frame_stack - 1` padding rows
(the older frames of its first observation) and ends with a row holding its final
observation and no action. Nothing is pickled: shards are `.npz` read with
`allow_pickle=False`, metadata is JSON.

* `DatasetWriter`: fed like `TransitionAdder` (`add_first` / `add`), writes a shard every
  `shard_size` rows as the run goes, each atomically (temp file, fsync, rename) and
  followed by an atomic rewrite of `meta.json`, so a crash loses at most the open shard.
* `DatasetReader`: validates the metadata and the files (sizes on open, sha256 checksums
  on open or lazily), streams episodes shard by shard, reports statistics, checks the env,
  and selects / corrupts subsets of transitions by global index.
* `replay_into`: pushes (selected, possibly corrupted) transitions into an adder.
* `import_dqn_replay`: converts Dopamine replay logs (Agarwal et al. 2020) checkpoint by
  checkpoint, streaming the observation arrays in chunks.
"""
from __future__ import annotations

import contextlib
import datetime
import gzip
import hashlib
import itertools
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

FORMAT_NAME = "eosrl-dataset"
FORMAT_VERSION = 1
META_FILE = "meta.json"
DEFAULT_SHARD_SIZE = 100_000
# Distinct reward values tracked for reward corruption; beyond this the set is dropped
# (continuous rewards have no meaningful "observed set").
MAX_REWARD_VALUES = 64
VERIFY_MODES = ("open", "lazy", "none")
SELECT_MODES = ("all", "first", "last", "random")
CORRUPT_FIELDS = ("actions", "rewards")
REWARD_CORRUPTIONS = ("observed", "flip")

# Per-row arrays of a shard besides `frames` and their dtypes (the format's contract).
ROW_FIELDS = {
    "actions": np.int32,         # a_t, -1 on padding and final rows
    "rewards": np.float32,       # raw r_{t+1}, 0 on padding and final rows
    "terminals": np.bool_,       # the step from this row terminated the episode
    "truncations": np.bool_,     # the step from this row truncated it (time limit)
    "life_losses": np.bool_,     # a life was lost on that step (Atari nature preset)
    "episode_starts": np.bool_,  # first row of an episode
    "stack_padding": np.bool_,   # an older frame of the first observation's stack
    "final_obs": np.bool_,       # last observation of an episode: no action
}
SHARD_ARRAYS = ("frames", "next_frame") + tuple(ROW_FIELDS)
_SHARD_NAME = re.compile(r"^shard_(\d{5,})\.npz$")


class DatasetError(ValueError):
    """A dataset that cannot be written or read as asked; one line naming the file."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.npz"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Makes a rename in `path` durable (the directory entry is what a crash can lose)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _env_identity(env: Any) -> Dict[str, str]:
    """{kind, id, preset} of an `EnvConfig`, or of a mapping with those keys."""
    get = env.get if isinstance(env, Mapping) else (lambda key, default=None: getattr(env, key, default))
    kind, env_id = get("kind"), get("id")
    if not kind or not env_id:
        raise DatasetError(f"env: expected kind and id (an EnvConfig or a mapping), got {env!r}")
    return {"kind": str(kind), "id": str(env_id), "preset": str(get("preset", "dopamine"))}


def _same_env(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """Same env as `make_env` would build it: ids compared as the factory resolves them
    (`Pong`, `ALE/Pong-v5`), the preset only where it means something (Atari)."""
    if a["kind"] != b["kind"]:
        return False
    if a["kind"] in ("atari", "minatar"):
        from envs.factory import game_key
        if game_key(a["id"]) != game_key(b["id"]):
            return False
    elif a["id"] != b["id"]:
        return False
    return a["kind"] != "atari" or a["preset"] == b["preset"]


def _describe_env(env: Mapping[str, str]) -> str:
    preset = f" (preset {env['preset']})" if env["kind"] == "atari" else ""
    return f"{env['kind']}/{env['id']}{preset}"


# ----------------------------------------------------------------------------
# Return statistics that merge across shards without keeping every return.


@dataclass
class _Moments:
    """Count, mean, sum of squared deviations, min and max of a stream (Welford; Chan's
    merge), so per-shard statistics combine exactly into the dataset's."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: Optional[float] = None
    max: Optional[float] = None

    def add(self, x: float) -> None:
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (x - self.mean)
        self.min = x if self.min is None else min(self.min, x)
        self.max = x if self.max is None else max(self.max, x)

    def merge(self, other: "_Moments") -> "_Moments":
        if other.count == 0:
            return _Moments(**vars(self))
        if self.count == 0:
            return _Moments(**vars(other))
        count = self.count + other.count
        delta = other.mean - self.mean
        return _Moments(count, self.mean + delta * other.count / count,
                        self.m2 + other.m2 + delta * delta * self.count * other.count / count,
                        min(self.min, other.min), max(self.max, other.max))

    def summary(self) -> Dict[str, Optional[float]]:
        """Population statistics (ddof=0, as `np.std`); None where there is no episode."""
        if self.count == 0:
            return {"count": 0, "mean": None, "std": None, "min": None, "max": None}
        return {"count": self.count, "mean": self.mean, "std": math.sqrt(self.m2 / self.count),
                "min": self.min, "max": self.max}


# ----------------------------------------------------------------------------
# Writing.


class _ShardBuffer:
    """The rows of the open shard in preallocated arrays, and what they count."""

    def __init__(self, capacity: int, frame_shape: tuple, frame_dtype: np.dtype):
        self.frames = np.zeros((capacity,) + frame_shape, frame_dtype)
        self.fields = {name: np.zeros(capacity, dtype) for name, dtype in ROW_FIELDS.items()}
        self.clear()

    def clear(self) -> None:
        self.size = 0
        self.transitions = 0
        self.episodes = 0
        self.returns = _Moments()

    def append(self, frame: np.ndarray, action: int = -1, reward: float = 0.0, terminal: bool = False,
               truncation: bool = False, life_loss: bool = False, start: bool = False,
               padding: bool = False, final: bool = False) -> None:
        i = self.size
        self.frames[i] = frame
        values = (action, reward, terminal, truncation, life_loss, start, padding, final)
        for array, value in zip(self.fields.values(), values):
            array[i] = value
        self.size += 1
        self.episodes += int(start)
        self.transitions += int(not (padding or final))

    def arrays(self) -> Dict[str, np.ndarray]:
        n = self.size
        return {"frames": self.frames[:n], **{k: v[:n] for k, v in self.fields.items()}}


class DatasetWriter:
    """Streams episodes into a dataset directory, one shard file per `shard_size` rows.

    Feed it like `TransitionAdder`: `add_first(obs)` after a reset, `add(action, reward,
    terminated, truncated, next_obs)` after each step (observations as the env gives them,
    frames stacked on the last axis when `frame_stack > 1`; rewards raw). `terminated`
    and `truncated` are the env's own flags (a life loss is `life_loss=True`, not a
    terminal). An episode left open by `add_first` or `close()` is cut: its last
    observation is written as its final row and it counts as incomplete.

    A shard holds `shard_size` rows (frames), plus at most `frame_stack` more so one call's
    rows stay together; episodes continue across shards. The open shard lives in memory
    (`shard_size` frames: 0.7 GB for 100k Atari frames). One writer per directory. Each shard is written to a
    temporary file, fsynced and renamed, then `meta.json` is rewritten the same way, so a
    crash loses at most the rows of the open shard. `resume=True` appends to a dataset a
    crashed writer left behind (its open episode stays cut).
    """

    def __init__(self, path: Union[str, Path], *, env: Any, frame_shape: Sequence[int], frame_dtype: Any,
                 frame_stack: int, num_actions: int, agent: Optional[Mapping[str, Any]] = None,
                 shard_size: int = DEFAULT_SHARD_SIZE, compress: bool = False,
                 rewards_clipped: bool = False, source: Optional[Mapping[str, Any]] = None,
                 resume: bool = False):
        if frame_stack < 1 or num_actions < 1 or shard_size < 1:
            raise DatasetError(f"DatasetWriter: frame_stack, num_actions and shard_size must be >= 1, got "
                               f"{frame_stack}, {num_actions}, {shard_size}")
        self.path = Path(path)
        self._env = _env_identity(env)
        self._frame_shape = tuple(int(d) for d in frame_shape)
        self._dtype = np.dtype(frame_dtype)
        self._stack = int(frame_stack)
        self._num_actions = int(num_actions)
        self._agent = dict(agent or {})
        self._shard_size = int(shard_size)
        self._compress = bool(compress)
        self._rewards_clipped = bool(rewards_clipped)
        self._source = dict(source) if source is not None else None
        # One call appends at most frame_stack rows (a cut final row and the padding).
        self._buffer = _ShardBuffer(self._shard_size + self._stack + 1, self._frame_shape, self._dtype)
        self._pending: Optional[np.ndarray] = None  # newest frame of the observation awaiting its action
        self._starting = False                      # the next row appended starts an episode
        self._return = 0.0                           # raw return of the open episode so far
        self._shards: List[Dict[str, Any]] = []
        self._reward_values: Optional[set] = set()
        self._collection: Dict[str, Optional[List[int]]] = {"learner_steps": None, "env_steps": None}
        self._created = _now()
        self._closed = False
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(".*.tmp"):  # left by a crash between write and rename
            stale.unlink()
        if (self.path / META_FILE).exists():
            if not resume:
                raise DatasetError(f"{self.path}: already holds a dataset ({META_FILE}); "
                                   f"pick a new directory or pass resume=True")
            self._resume(_load_meta(self.path))
        self._write_meta()

    @classmethod
    def for_env(cls, path: Union[str, Path], env_config: Any, **kwargs) -> "DatasetWriter":
        """A writer whose frame shape, dtype, stack and action count come from the env."""
        from envs.factory import env_spec
        spec = env_spec(env_config)
        return cls(path, env=env_config, frame_shape=spec.frame_shape, frame_dtype=spec.obs_dtype,
                   frame_stack=spec.frame_stack, num_actions=spec.num_actions, **kwargs)

    def _resume(self, meta: Dict[str, Any]) -> None:
        mine = {"frame_shape": list(self._frame_shape), "frame_dtype": self._dtype.name,
                "frame_stack": self._stack, "num_actions": self._num_actions}
        for key, value in mine.items():
            if meta[key] != value:
                raise DatasetError(f"{self.path / META_FILE}: cannot resume, {key} is {meta[key]}, not {value}")
        if not _same_env(meta["env"], self._env):
            raise DatasetError(f"{self.path / META_FILE}: cannot resume, recorded on "
                               f"{_describe_env(meta['env'])}, not {_describe_env(self._env)}")
        self._shards = list(meta["shards"])
        self._created = meta["created"]
        values = meta.get("reward_values")
        self._reward_values = set(values) if values is not None else None
        self._collection = dict(meta.get("collection") or self._collection)

    # --- the TransitionAdder-shaped interface ---------------------------------

    def add_first(self, obs: np.ndarray) -> None:
        """The first observation of an episode (after a reset)."""
        obs = np.asarray(obs)
        frames = np.moveaxis(obs, -1, 0) if self._stack > 1 else obs[None]
        self.begin_episode(frames)

    def add(self, action: int, reward: float, terminated: bool, truncated: bool, next_obs: np.ndarray,
            life_loss: bool = False) -> None:
        """One env step from the last observation; `reward` raw (unclipped)."""
        next_obs = np.asarray(next_obs)
        self.step(action, reward, terminated, truncated, next_obs[..., -1] if self._stack > 1 else next_obs,
                  life_loss)

    # --- the frame-level interface (importers, converters) ---------------------

    def begin_episode(self, frames: np.ndarray) -> None:
        """Starts an episode from its first observation as `frame_stack` frames, oldest first."""
        self._check_open()
        frames = np.asarray(frames)
        if frames.shape != (self._stack,) + self._frame_shape:
            raise DatasetError(f"{self.path}: first observation has frames of shape {frames.shape}, "
                               f"expected {(self._stack,) + self._frame_shape}")
        if self._pending is not None:
            self._end_episode(complete=False)
        self._starting = True
        for frame in frames[:-1]:
            self._append(self._frame(frame), padding=True)
        self._pending = self._frame(frames[-1])
        self._return = 0.0
        self._maybe_flush()

    def step(self, action: int, reward: float, terminated: bool, truncated: bool, next_frame: np.ndarray,
             life_loss: bool = False) -> None:
        """One step from the current observation; `next_frame` is the newest frame after it."""
        self._check_open()
        if self._pending is None:
            raise DatasetError(f"{self.path}: a step without an open episode; call add_first(obs) after a reset")
        action, reward = int(action), float(reward)
        if not 0 <= action < self._num_actions:
            raise DatasetError(f"{self.path}: action {action} outside [0, {self._num_actions})")
        if not math.isfinite(reward):
            raise DatasetError(f"{self.path}: reward {reward} is not finite")
        next_frame = self._frame(next_frame)
        self._append(self._pending, action=action, reward=reward, terminal=bool(terminated),
                     truncation=bool(truncated), life_loss=bool(life_loss))
        self._return += reward
        self._note_reward(reward)
        self._pending = next_frame
        if terminated or truncated:
            self._end_episode(complete=True)
        self._maybe_flush()

    def cut_episode(self) -> None:
        """Ends the open episode at its current observation, as incomplete."""
        self._check_open()
        if self._pending is not None:
            self._end_episode(complete=False)
            self._maybe_flush()

    def note_progress(self, learner_step: Optional[int] = None, env_step: Optional[int] = None) -> None:
        """Widens the recorded learner-step / env-step range of the collecting agent."""
        for key, value in (("learner_steps", learner_step), ("env_steps", env_step)):
            if value is not None:
                lo, hi = self._collection[key] or (int(value), int(value))
                self._collection[key] = [min(lo, int(value)), max(hi, int(value))]

    def close(self) -> None:
        """Cuts the open episode, writes the open shard and marks the dataset closed."""
        if self._closed:
            return
        self.cut_episode()
        self._flush()
        self._closed = True
        self._write_meta()

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        # Also on an exception: what was collected is kept.
        self.close()

    def set_source(self, source: Optional[Mapping[str, Any]]) -> None:
        """Replaces the provenance record (`source` in meta.json) written from now on."""
        self._source = dict(source) if source is not None else None

    @property
    def shards_written(self) -> int:
        return len(self._shards)

    # --- internals ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise DatasetError(f"{self.path}: the writer is closed")

    def _frame(self, frame: np.ndarray) -> np.ndarray:
        frame = np.asarray(frame)
        if frame.shape != self._frame_shape:
            raise DatasetError(f"{self.path}: frame of shape {frame.shape}, expected {self._frame_shape}")
        # same_kind: float64 -> float32 is fine, float -> uint8 is a caller's bug.
        out = np.empty(self._frame_shape, self._dtype)
        np.copyto(out, frame, casting="same_kind")
        return out

    def _append(self, frame: np.ndarray, **flags) -> None:
        self._buffer.append(frame, start=self._starting, **flags)
        self._starting = False

    def _end_episode(self, complete: bool) -> None:
        self._append(self._pending, final=True)
        if complete:
            self._buffer.returns.add(self._return)
        self._pending = None

    def _note_reward(self, reward: float) -> None:
        if self._reward_values is not None:
            self._reward_values.add(reward)
            if len(self._reward_values) > MAX_REWARD_VALUES:
                self._reward_values = None

    def _maybe_flush(self) -> None:
        if self._buffer.size >= self._shard_size:
            self._flush()

    def _flush(self) -> None:
        buffer = self._buffer
        if buffer.size == 0:
            return
        name = shard_name(len(self._shards))
        arrays = buffer.arrays()
        # The open episode's current observation: its row opens the next shard, and this
        # copy lets a reader end the episode here if no next shard ever comes (a crash).
        tail = [self._pending] if self._pending is not None else []
        arrays["next_frame"] = np.array(tail, self._dtype).reshape((len(tail),) + self._frame_shape)
        tmp, final = self.path / f".{name}.tmp", self.path / name
        with open(tmp, "wb") as f:
            (np.savez_compressed if self._compress else np.savez)(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        entry = {"file": name, "sha256": _sha256(tmp), "bytes": tmp.stat().st_size, "rows": buffer.size,
                 "transitions": buffer.transitions, "episodes": buffer.episodes,
                 "complete_episodes": buffer.returns.count, "returns": vars(buffer.returns).copy()}
        os.replace(tmp, final)
        _fsync_dir(self.path)
        self._shards.append(entry)
        buffer.clear()
        self._write_meta()

    def _write_meta(self) -> None:
        returns = _Moments()
        for shard in self._shards:
            returns = returns.merge(_Moments(**shard["returns"]))
        totals = {key: sum(s[key] for s in self._shards)
                  for key in ("rows", "transitions", "episodes", "complete_episodes")}
        meta = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION,
            "created": self._created, "updated": _now(), "closed": self._closed,
            "env": self._env, "frame_shape": list(self._frame_shape), "frame_dtype": self._dtype.name,
            "frame_stack": self._stack, "num_actions": self._num_actions,
            "agent": self._agent, "collection": self._collection, "source": self._source,
            "rewards_clipped": self._rewards_clipped, "compressed": self._compress,
            "shard_size": self._shard_size,
            "reward_values": sorted(self._reward_values) if self._reward_values is not None else None,
            "totals": {**totals, "returns": returns.summary()},
            "shards": self._shards,
        }
        _atomic_write_text(self.path / META_FILE, json.dumps(meta, indent=1) + "\n")


# ----------------------------------------------------------------------------
# Reading.

_REQUIRED_META = ("format", "version", "env", "frame_shape", "frame_dtype", "frame_stack", "num_actions",
                  "shards", "created", "closed")
_REQUIRED_SHARD = ("file", "sha256", "bytes", "rows", "transitions", "episodes", "complete_episodes", "returns")


def _load_meta(path: Path) -> Dict[str, Any]:
    """meta.json, checked for format, version and the keys this version needs."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise DatasetError(f"{meta_path}: missing; {path} is not an eosrl dataset")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{meta_path}: unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DatasetError(f"{meta_path}: format is {found!r}, not {FORMAT_NAME!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{meta_path}: format version {meta.get('version')!r} is not supported "
                           f"(this eosrl reads version {FORMAT_VERSION})")
    missing = [key for key in _REQUIRED_META if key not in meta]
    missing += [f"shards[{i}].{key}" for i, s in enumerate(meta.get("shards", [])) for key in _REQUIRED_SHARD
                if key not in s]
    if missing:
        raise DatasetError(f"{meta_path}: missing keys {', '.join(missing)}")
    return meta


@dataclass
class Episode:
    """One episode as recorded: `frames` holds the `frame_stack - 1` padding frames, then
    the newest frame of observations 0..L; the other arrays hold steps 0..L-1."""

    frames: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    truncations: np.ndarray
    life_losses: np.ndarray
    frame_stack: int
    first_transition: int
    """Global index (recording order) of this episode's first transition."""

    @property
    def length(self) -> int:
        return len(self.actions)

    @property
    def complete(self) -> bool:
        """Ended by the env (terminal or time limit), not cut by the recording."""
        return self.length > 0 and bool(self.terminals[-1] or self.truncations[-1])

    @property
    def episode_return(self) -> float:
        return float(np.sum(self.rewards, dtype=np.float64))

    def observation(self, t: int) -> np.ndarray:
        """Observation t (0..L) as the env gave it: frames stacked on the last axis."""
        if not 0 <= t <= self.length:
            raise IndexError(f"observation {t} outside 0..{self.length}")
        if self.frame_stack == 1:
            return self.frames[t]
        return np.moveaxis(self.frames[t:t + self.frame_stack], 0, -1)


class _EpisodeAssembler:
    """Joins the rows of episodes that span shards, and checks the layout as it goes."""

    def __init__(self, frame_stack: int, frame_shape: tuple, frame_dtype: np.dtype):
        self._stack = frame_stack
        self._empty_frame = np.zeros((0,) + frame_shape, frame_dtype)
        self._pieces: List[Dict[str, np.ndarray]] = []
        self._tail = self._empty_frame
        self._where = ""
        self._next_transition = 0

    def feed(self, shard: Dict[str, np.ndarray], where: str) -> Iterator[Episode]:
        starts, finals = shard["episode_starts"], shard["final_obs"]
        n = len(starts)
        after_final = np.flatnonzero(finals) + 1
        if not np.all((after_final == n) | starts[np.minimum(after_final, n - 1)]):
            raise DatasetError(f"{where}: a final observation row is not followed by an episode start")
        bounds = np.union1d(np.flatnonzero(starts), [0, n])
        for a, b in zip(bounds[:-1], bounds[1:]):
            if starts[a] and self._pieces:
                yield self._emit(cut=True)
            elif not starts[a] and not self._pieces:
                raise DatasetError(f"{where}: row {a} continues an episode that no earlier shard started")
            self._pieces.append({k: v[a:b] for k, v in shard.items() if k != "next_frame"})
            self._where = where
            if finals[b - 1]:
                yield self._emit(cut=False)
        if self._pieces:
            # Copies, so this shard's arrays can be freed while the episode goes on.
            self._pieces = [{k: v.copy() for k, v in piece.items()} for piece in self._pieces]
            self._tail = shard["next_frame"].copy()

    def finish(self) -> Iterator[Episode]:
        if self._pieces:
            yield self._emit(cut=True)

    def _check_layout(self, rows: Dict[str, np.ndarray], cut: bool) -> None:
        """An episode's rows: `stack - 1` padding rows, steps, and one final row unless cut."""
        pad, n = self._stack - 1, len(rows["frames"])
        expected_padding = np.arange(n) < pad
        expected_final = np.zeros(n, bool)
        if not cut:
            expected_final[-1] = True
        if (n < pad + (0 if cut else 1) or not np.array_equal(rows["stack_padding"], expected_padding)
                or not np.array_equal(rows["final_obs"], expected_final) or rows["episode_starts"][1:].any()):
            raise DatasetError(f"{self._where}: episode rows do not follow the layout "
                               f"({pad} padding rows, steps, one final row)")

    def _emit(self, cut: bool) -> Episode:
        rows = {k: np.concatenate([p[k] for p in self._pieces]) for k in self._pieces[0]}
        self._pieces = []
        frames = rows["frames"]
        if cut:  # the recording stopped inside the episode: its last observation is the tail
            if len(self._tail) != 1:
                raise DatasetError(f"{self._where}: an episode is left open without its next_frame")
            frames = np.concatenate([frames, self._tail])
        self._check_layout(rows, cut)
        steps = ~(rows["stack_padding"] | rows["final_obs"])
        episode = Episode(frames=frames, frame_stack=self._stack, first_transition=self._next_transition,
                          **{k: rows[k][steps] for k in ("actions", "rewards", "terminals", "truncations",
                                                          "life_losses")})
        self._next_transition += episode.length
        return episode


@dataclass(frozen=True)
class Corruption:
    """Transitions whose `field` is replaced: sorted global `indices`, their new `values`."""

    field: str
    indices: np.ndarray
    values: np.ndarray
    method: str

    def slice(self, first: int, length: int) -> Tuple[np.ndarray, np.ndarray]:
        """(positions within [first, first+length), values) of the corrupted transitions there."""
        lo, hi = np.searchsorted(self.indices, [first, first + length])
        return self.indices[lo:hi] - first, self.values[lo:hi]


class DatasetReader:
    """Reads a dataset directory written by `DatasetWriter` (or an importer).

    `verify`: `open` checks every shard's sha256 when opening; `lazy` (default) checks a
    shard the first time it is read; `none` skips checksums. Every mode checks on open
    that the shard files exist with the sizes meta.json records, so a missing or truncated
    file fails at once. Problems raise `DatasetError` naming the file and the shard.
    """

    def __init__(self, path: Union[str, Path], verify: str = "lazy"):
        if verify not in VERIFY_MODES:
            raise DatasetError(f"verify: unknown value {verify!r} (valid: {', '.join(VERIFY_MODES)})")
        self.path = Path(path)
        self.meta = _load_meta(self.path)
        self._verify = verify
        self._verified: set = set()
        self.frame_shape = tuple(self.meta["frame_shape"])
        self.frame_dtype = np.dtype(self.meta["frame_dtype"])
        self.frame_stack = int(self.meta["frame_stack"])
        self.num_actions = int(self.meta["num_actions"])
        self._shards = self.meta["shards"]
        for index in range(len(self._shards)):
            self._check_size(index)
            if verify == "open":
                self._check_checksum(index)

    # --- shards -----------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def num_transitions(self) -> int:
        return sum(s["transitions"] for s in self._shards)

    @property
    def num_episodes(self) -> int:
        return sum(s["episodes"] for s in self._shards)

    def _where(self, index: int) -> str:
        return f"{self.path / self._shards[index]['file']} (shard {index})"

    def _check_size(self, index: int) -> None:
        entry, file = self._shards[index], self.path / self._shards[index]["file"]
        if not file.is_file():
            raise DatasetError(f"{self._where(index)}: missing")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise DatasetError(f"{self._where(index)}: truncated or altered, {size} bytes where "
                               f"{META_FILE} records {entry['bytes']}")

    def _check_checksum(self, index: int) -> None:
        if index in self._verified:
            return
        if _sha256(self.path / self._shards[index]["file"]) != self._shards[index]["sha256"]:
            raise DatasetError(f"{self._where(index)}: sha256 checksum mismatch (the file is corrupted)")
        self._verified.add(index)

    def load_shard(self, index: int, fields: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
        """A shard's arrays (all, or `fields`), checked against meta.json and the format."""
        if not 0 <= index < self.num_shards:
            raise DatasetError(f"{self.path}: no shard {index} (the dataset has {self.num_shards})")
        self._check_size(index)
        if self._verify != "none":
            self._check_checksum(index)
        names = list(fields) if fields is not None else list(SHARD_ARRAYS)
        try:
            with np.load(self.path / self._shards[index]["file"], allow_pickle=False) as npz:
                missing = [k for k in names if k not in npz.files]
                if missing:
                    raise DatasetError(f"{self._where(index)}: missing arrays {', '.join(missing)}")
                arrays = {k: npz[k] for k in names}
        except DatasetError:
            raise
        except Exception as e:  # zipfile, zlib and numpy format errors alike
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise DatasetError(f"{self._where(index)}: unreadable ({type(e).__name__}: {first})") from None
        self._check_arrays(index, arrays)
        return arrays

    def _check_arrays(self, index: int, arrays: Dict[str, np.ndarray]) -> None:
        rows = self._shards[index]["rows"]
        for name, array in arrays.items():
            if name == "next_frame":
                ok = array.shape[1:] == self.frame_shape and len(array) <= 1 and array.dtype == self.frame_dtype
            elif name == "frames":
                ok = array.shape == (rows,) + self.frame_shape and array.dtype == self.frame_dtype
            else:
                ok = array.shape == (rows,) and array.dtype == np.dtype(ROW_FIELDS[name])
            if not ok:
                raise DatasetError(f"{self._where(index)}: array {name} has shape {array.shape} and dtype "
                                   f"{array.dtype}, not what {META_FILE} describes")
        if "stack_padding" in arrays and "final_obs" in arrays:
            transitions = int(np.sum(~(arrays["stack_padding"] | arrays["final_obs"])))
            if transitions != self._shards[index]["transitions"]:
                raise DatasetError(f"{self._where(index)}: {transitions} transitions where {META_FILE} "
                                   f"records {self._shards[index]['transitions']}")

    # --- episodes ---------------------------------------------------------------

    def iter_episodes(self) -> Iterator[Episode]:
        """Episodes in recording order, one shard in memory at a time (plus the rows of an
        episode that continues into the next shard)."""
        assembler = _EpisodeAssembler(self.frame_stack, self.frame_shape, self.frame_dtype)
        for index in range(self.num_shards):
            yield from assembler.feed(self.load_shard(index), self._where(index))
        yield from assembler.finish()

    # --- summaries and checks ---------------------------------------------------

    def info(self) -> Dict[str, Any]:
        """Size, counts and return statistics (raw rewards, complete episodes only), from
        meta.json; reads no shard."""
        returns = _Moments()
        for shard in self._shards:
            returns = returns.merge(_Moments(**shard["returns"]))
        files = [self.path / META_FILE] + [self.path / s["file"] for s in self._shards]
        m = self.meta
        return {
            "path": str(self.path), "format": m["format"], "version": m["version"],
            "env": dict(m["env"]), "frame_shape": self.frame_shape, "frame_dtype": self.frame_dtype.name,
            "frame_stack": self.frame_stack, "num_actions": self.num_actions,
            "agent": m.get("agent"), "collection": m.get("collection"), "source": m.get("source"),
            "created": m["created"], "closed": m["closed"], "rewards_clipped": m.get("rewards_clipped", False),
            "size_bytes": sum(f.stat().st_size for f in files), "shards": self.num_shards,
            "rows": sum(s["rows"] for s in self._shards), "transitions": self.num_transitions,
            "episodes": self.num_episodes, "complete_episodes": returns.count, "returns": returns.summary(),
        }

    def check_env(self, env_config: Any) -> None:
        """Raises DatasetError unless the dataset was recorded on this env (kind, id, preset)."""
        wanted = _env_identity(env_config)
        if not _same_env(self.meta["env"], wanted):
            raise DatasetError(f"{self.path}: recorded on {_describe_env(self.meta['env'])}, "
                               f"but the config asks for {_describe_env(wanted)}")

    def check_frames(self, frame_shape: Sequence[int], frame_dtype: Any) -> None:
        """Raises DatasetError unless the frames are what the env's replay table stores."""
        if self.frame_shape != tuple(frame_shape) or self.frame_dtype != np.dtype(frame_dtype):
            raise DatasetError(f"{self.path / META_FILE}: frames are {self.frame_dtype.name} "
                               f"{list(self.frame_shape)}, but this env's replay stores "
                               f"{np.dtype(frame_dtype).name} {list(frame_shape)} (record the dataset again)")

    # --- subsets and corruption ---------------------------------------------------

    def select(self, mode: str, count: Optional[int] = None, seed: int = 0) -> np.ndarray:
        """Boolean mask over the global transition order (recording order):
        `all`; `first` / `last` `count` transitions; `random`: `count` drawn without
        replacement with `seed`."""
        n = self.num_transitions
        if mode not in SELECT_MODES:
            raise DatasetError(f"select: unknown mode {mode!r} (valid: {', '.join(SELECT_MODES)})")
        mask = np.zeros(n, bool)
        if mode == "all":
            mask[:] = True
            return mask
        if count is None or not 0 <= count <= n:
            raise DatasetError(f"select {mode}: count must be in [0, {n}] (the dataset's transitions), got {count}")
        if mode == "first":
            mask[:count] = True
        elif mode == "last":
            mask[n - count:] = True
        else:
            mask[np.random.default_rng(seed).choice(n, size=count, replace=False)] = True
        return mask

    def _indices(self, selection: Optional[np.ndarray]) -> np.ndarray:
        """Sorted global indices from a mask (or an index array; None: all)."""
        n = self.num_transitions
        if selection is None:
            return np.arange(n)
        selection = np.asarray(selection)
        if selection.dtype == bool:
            if selection.shape != (n,):
                raise DatasetError(f"selection: a mask of shape {selection.shape}, the dataset has {n} transitions")
            return np.flatnonzero(selection)
        indices = np.unique(selection.astype(np.int64))
        if len(indices) and (indices[0] < 0 or indices[-1] >= n):
            raise DatasetError(f"selection: indices outside [0, {n})")
        return indices

    def corrupt(self, selection: Optional[np.ndarray], fraction: float, field: str, seed: int = 0,
                num_actions: Optional[int] = None, reward_method: str = "observed") -> Corruption:
        """Picks round(fraction * |selection|) selected transitions (seeded, without
        replacement) and gives each a new `actions` or `rewards` value.

        Actions: uniform over `num_actions` (the dataset's by default). Rewards, `observed`:
        uniform over the distinct raw rewards the dataset contains, so corrupted values stay
        inside the reward support; `flip`: the negated recorded reward (a zero stays zero).
        A new value can equal the old one; the fraction counts replacements.
        """
        if field not in CORRUPT_FIELDS:
            raise DatasetError(f"corrupt: unknown field {field!r} (valid: {', '.join(CORRUPT_FIELDS)})")
        if not 0.0 <= fraction <= 1.0:
            raise DatasetError(f"corrupt: fraction must be in [0, 1], got {fraction}")
        pool = self._indices(selection)
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(pool, size=int(math.floor(fraction * len(pool) + 0.5)), replace=False))
        if field == "actions":
            num_actions = int(num_actions or self.num_actions)
            values = rng.integers(0, num_actions, size=len(chosen)).astype(np.int32)
            return Corruption(field, chosen, values, "uniform")
        if reward_method not in REWARD_CORRUPTIONS:
            raise DatasetError(f"corrupt: unknown reward_method {reward_method!r} "
                               f"(valid: {', '.join(REWARD_CORRUPTIONS)})")
        if reward_method == "flip":
            return Corruption(field, chosen, -self._field_at("rewards", chosen), "flip")
        observed = self.meta.get("reward_values")
        if not observed:
            raise DatasetError(f"{self.path}: no observed reward set in {META_FILE} (more than "
                               f"{MAX_REWARD_VALUES} distinct rewards); use reward_method='flip'")
        values = np.asarray(observed, np.float32)[rng.integers(0, len(observed), size=len(chosen))]
        return Corruption(field, chosen, values, "observed")

    def _field_at(self, name: str, indices: np.ndarray) -> np.ndarray:
        """Recorded values of a per-step field at sorted global transition indices, reading
        that array (and the row flags) one shard at a time."""
        out, first = [], 0
        for index, shard in enumerate(self._shards):
            lo, hi = np.searchsorted(indices, [first, first + shard["transitions"]])
            if hi > lo:
                arrays = self.load_shard(index, [name, "stack_padding", "final_obs"])
                steps = arrays[name][~(arrays["stack_padding"] | arrays["final_obs"])]
                out.append(steps[indices[lo:hi] - first])
            first += shard["transitions"]
        return np.concatenate(out) if out else np.zeros(0, ROW_FIELDS[name])


# ----------------------------------------------------------------------------
# Feeding replay from a dataset.


def _runs(mask: np.ndarray) -> List[Tuple[int, int]]:
    """[start, end) of each maximal run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def replay_into(reader: DatasetReader, adder: Any, selection: Optional[np.ndarray] = None,
                corruption: Optional[Corruption] = None, clip_rewards: bool = False,
                life_loss_terminal: bool = False) -> Dict[str, int]:
    """Pushes the selected transitions, in recording order, into an adder with
    `observe_first(obs)` / `observe(action, reward, terminal, next_obs, episode_over)`.

    Each maximal run of selected transitions inside an episode becomes one adder episode:
    it opens with `observe_first` at the run's first observation (its stack holds the real
    earlier frames) and its last step has `episode_over=True`. A run that stops before the
    episode's end therefore bootstraps from its last observation, like a time limit; n-step
    returns never reach past a gap in the selection. `terminal` is the recorded env terminal
    (or a recorded life loss, with `life_loss_terminal`). Corrupted values replace the
    recorded ones before the optional clipping to [-1, 1], as the actor clips.
    Returns counts of transitions, adder episodes (runs) and dataset episodes touched.
    """
    mask = None if selection is None else np.zeros(reader.num_transitions, bool)
    if mask is not None:
        mask[reader._indices(selection)] = True
    if corruption is not None and corruption.field not in CORRUPT_FIELDS:
        raise DatasetError(f"replay_into: corruption of unknown field {corruption.field!r}")
    counts = {"transitions": 0, "runs": 0, "episodes": 0}
    for episode in reader.iter_episodes():
        first, length = episode.first_transition, episode.length
        chosen = np.ones(length, bool) if mask is None else mask[first:first + length]
        runs = _runs(chosen)
        if not runs:
            continue
        actions, rewards = episode.actions.copy(), episode.rewards.copy()
        if corruption is not None:
            positions, values = corruption.slice(first, length)
            (actions if corruption.field == "actions" else rewards)[positions] = values
        if clip_rewards:
            rewards = np.clip(rewards, -1.0, 1.0)
        terminals = episode.terminals | (episode.life_losses if life_loss_terminal else False)
        for start, end in runs:
            adder.observe_first(episode.observation(start))
            for t in range(start, end):
                adder.observe(int(actions[t]), float(rewards[t]), bool(terminals[t]),
                              episode.observation(t + 1), t == end - 1)
        counts["transitions"] += int(chosen.sum())
        counts["runs"] += len(runs)
        counts["episodes"] += 1
    return counts


# ----------------------------------------------------------------------------
# Importing the DQN Replay Dataset (Dopamine replay logs).
#
# Dopamine's replay buffer is circular: its add number a (zero padding rows count) goes to
# row a % cap, so a save taken after A adds holds adds max(0, A - cap) .. A - 1, the oldest
# on row A % cap once the buffer has wrapped. A save stores A as `add_count`, except:
# * The dataset was written by batch_rl's OutOfGraphLoggedReplayBuffer, which saves ("logs")
#   after an add() call that leaves A % cap == cap - 1. A call whose padding rows pass that
#   point (a padding row on row cap - 2) skips the log: the checkpoint numbers stay
#   consecutive while the add counts jump by 2 cap, and the first log can come at 2 cap - 1.
# * Its final log (`log_final_buffer`) stores the cursor A % cap instead of A, so A is known
#   from the previous checkpoint only, up to a multiple of cap. The smallest candidate is the
#   right one exactly when the rows both saves hold are unchanged, which the importer
#   compares; any other means logs were skipped in between. A run logs nothing after it.
# Dopamine's own `save` (a checkpoint each iteration) stores the true A at any cursor and
# fill level. Given A for two saves, the later one's rows continue the earlier one's exactly
# when no add between them was overwritten (A2 - cap <= A1); it holds the shared rows again.

DQN_REPLAY_STACK = 4
DQN_REPLAY_LAYOUTS = ("logged", "chronological")
_STORE_FILE = re.compile(r"^\$store\$_(observation|action|reward|terminal)_ckpt\.(\d+)\.gz$")
_STORE_KEYS = ("observation", "action", "reward", "terminal")
_SMALL_KEYS = ("action", "reward", "terminal")
# Where two checkpoints hold the same rows, all their actions, rewards and terminals are
# compared, and this many of the newest frames (kept in memory from the earlier one).
_COMPARED_FRAMES = 64


def _store_path(src: Path, key: str, checkpoint: int) -> Path:
    return src / f"$store$_{key}_ckpt.{checkpoint}.gz"


def _load_small(path: Path) -> np.ndarray:
    """A whole gzipped `.npy` (the per-step action/reward/terminal arrays: a few MB)."""
    try:
        with gzip.open(path, "rb") as f:
            return np.load(f, allow_pickle=False)
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise DatasetError(f"{path}: unreadable gzipped .npy ({type(e).__name__}: {first})") from None


class _NpyRows:
    """Rows of a gzipped `.npy` read in chunks: the header, then `rows` rows at a time,
    so a 1M-frame observation array (7 GB) never sits in memory whole."""

    def __init__(self, path: Path):
        self.path = path
        self._file = gzip.open(path, "rb")
        try:
            version = np.lib.format.read_magic(self._file)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            self.shape, fortran, self.dtype = read_header(self._file)
        except Exception as e:
            self._file.close()
            raise DatasetError(f"{path}: not a gzipped .npy ({type(e).__name__}: {e})") from None
        if self.dtype.hasobject or fortran or not self.shape:
            self._file.close()
            raise DatasetError(f"{path}: expected a C-ordered numeric array, got dtype {self.dtype} "
                               f"shape {self.shape} fortran={fortran}")
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def read(self, rows: int) -> np.ndarray:
        try:
            data = self._file.read(rows * self._row_bytes)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise DatasetError(f"{self.path}: unreadable ({type(e).__name__}: {e})") from None
        if len(data) != rows * self._row_bytes:
            raise DatasetError(f"{self.path}: truncated, the header promises {self.shape[0]} rows")
        return np.frombuffer(data, self.dtype).reshape((rows,) + tuple(self.shape[1:]))

    def chunks(self, rows: int, chunk_rows: int) -> Iterator[np.ndarray]:
        for lo in range(0, rows, chunk_rows):
            yield self.read(min(chunk_rows, rows - lo))

    def close(self) -> None:
        self._file.close()


class _DopamineEpisodes:
    """Turns Dopamine's replay rows, in chronological order, into writer calls.

    Dopamine stores row t = (o_t, a_t, r_t, terminal_t): the observation the action was
    taken from. Before each episode (and at the start of an empty buffer) it adds
    `stack - 1` zero rows, which are exactly the older frames of the first observation's
    stack as the agent saw it, so they become this format's padding rows. The
    observation after a terminal step is never logged; the final row gets a zero frame,
    which is what Dopamine's own sampler stacks there (the zero padding that follows).
    """

    def __init__(self, writer: DatasetWriter, frame_shape: tuple, frame_dtype: np.dtype, stack: int):
        self._w = writer
        self._zero = np.zeros(frame_shape, frame_dtype)
        self._pad = stack - 1
        self._state = "skip"                 # skip | padding | episode
        self._pad_frames: List[np.ndarray] = []
        self._pending: Optional[Tuple[int, float]] = None  # last step, awaiting its next frame
        self.skipped_rows = 0
        self.cut_steps = 0

    @property
    def needs_frames(self) -> bool:
        return self._state != "skip"

    def expect_episode_start(self) -> None:
        self._state, self._pad_frames = "padding", []

    def row(self, frame: np.ndarray, action: int, reward: float, terminal: bool, where: str) -> None:
        if self._state == "skip":
            # The episode began in a checkpoint that was not imported: wait for its end.
            self.skipped_rows += 1
            if terminal:
                self.expect_episode_start()
            return
        if self._state == "padding" and len(self._pad_frames) < self._pad:
            if terminal or action != 0 or reward != 0 or frame.any():
                raise DatasetError(f"{where}: expected Dopamine's zero padding row before an episode")
            self._pad_frames.append(frame)
            return
        if self._state == "padding":
            self._w.begin_episode(np.stack(self._pad_frames + [frame]))
            self._state = "episode"
        else:
            self._w.step(*self._pending, False, False, frame)
        self._pending = (action, reward)
        if terminal:
            self._w.step(action, reward, True, False, self._zero)
            self._pending = None
            self.expect_episode_start()

    def cut(self) -> None:
        """The next row is not this one's successor: end the open episode where it is."""
        if self._state == "episode":
            self.cut_steps += 1  # its last step has no logged next observation
            self._w.cut_episode()
        self._pending, self._state = None, "skip"


def dqn_replay_checkpoints(src_dir: Union[str, Path]) -> List[int]:
    """Checkpoint numbers with all four store files in a replay_logs directory."""
    src = Path(src_dir)
    found: Dict[int, set] = {}
    for path in src.iterdir() if src.is_dir() else []:
        match = _STORE_FILE.match(path.name)
        if match:
            found.setdefault(int(match.group(2)), set()).add(match.group(1))
    return sorted(n for n, keys in found.items() if keys == set(_STORE_KEYS))


@dataclass
class _CheckpointPlan:
    """How one checkpoint's rows are imported, decided from add counts before any row is read."""

    checkpoint: int
    rows: int                        # rows of its store files: the buffer's capacity
    segments: List[Tuple[int, int]]  # row ranges [lo, hi) holding its adds, oldest first
    overlap: int                     # leading rows of `segments` the previous checkpoint also held
    link: str                        # "start": the buffer began empty here; "continue": its first new row
    #                                  follows the previous checkpoint's last; "join": begin at its
    #                                  first episode start (a gap before it, or the import begins mid-run)
    add_count: Optional[int]         # adds made when it was saved; None when unknown
    stored: Optional[int]            # its add_count file's value (None: chronological layout)
    final: bool                      # a final log: changed shared rows mean skipped logs (join), and
    #                                  nothing may follow it

    def order(self) -> np.ndarray:
        """Its rows, oldest first."""
        return np.concatenate([np.arange(lo, hi, dtype=np.int64) for lo, hi in self.segments])


def _stored_add_count(src: Path, checkpoint: int, n: int) -> Tuple[int, Path]:
    """The checkpoint's add_count and the file it comes from."""
    path = src / f"add_count_ckpt.{checkpoint}.gz"
    if not path.is_file():  # batch_rl numbers its logs: take checkpoint N to be the N-th full one
        return checkpoint * n + n - 1, _store_path(src, "observation", checkpoint)
    value = _load_small(path)
    if value.size != 1 or value.dtype.kind not in "iu" or int(value.reshape(())) < 0:
        raise DatasetError(f"{path}: expected a non-negative integer, got {value.dtype} of shape {value.shape}")
    return int(value.reshape(())), path


def _saved_rows(count: int, n: int) -> List[Tuple[int, int]]:
    """The rows holding a save's adds, oldest first: 0..count-1 until the buffer wrapped,
    then from the cursor on round the buffer."""
    if count <= n:
        return [(0, count)]
    cursor = count % n
    return [(cursor, n), (0, cursor)] if cursor else [(0, n)]


def _plan_logged(src: Path, checkpoint: int, n: int, previous: Optional[_CheckpointPlan]) -> _CheckpointPlan:
    """A checkpoint of Dopamine saves (batch_rl logs or Dopamine's own), linked to the previous
    imported one by add counts; see the comment above."""
    stored, path = _stored_add_count(src, checkpoint, n)
    if previous is not None and previous.final:
        raise DatasetError(f"{path}: checkpoint {checkpoint} follows checkpoint {previous.checkpoint}, a final log "
                           f"(its add_count {previous.stored} is the cursor); a run logs nothing after it")
    if previous is not None and previous.rows != n:
        raise DatasetError(f"{path}: a {n}-row buffer, checkpoint {previous.checkpoint}'s has {previous.rows} rows")
    if stored < n and previous is None and checkpoint > 0:
        # Read alone, a final log after at least one full cycle: its rows newer than the
        # run's last full log are cap-1, then 0..cursor-1.
        return _CheckpointPlan(checkpoint, n, [(n - 1, n), (0, stored)], 0, "join", None, stored, True)
    if previous is None:  # the buffer began empty in this save if it holds add 0
        count = stored
        return _CheckpointPlan(checkpoint, n, _saved_rows(count, n), 0, "start" if count <= n else "join",
                               count, stored, False)
    # A cursor (stored < n) stands for the smallest add count it allows after the previous save.
    count = stored if stored >= n else previous.add_count + (stored - previous.add_count) % n
    if count < previous.add_count:
        raise DatasetError(f"{path}: add_count {stored} is below checkpoint {previous.checkpoint}'s "
                           f"{previous.add_count}: not the same run, or not in order")
    shared = previous.add_count - max(count - n, 0)  # < 0: the adds in between are in neither save
    return _CheckpointPlan(checkpoint, n, _saved_rows(count, n), max(shared, 0),
                           "continue" if shared >= 0 else "join", count, stored, count != stored)


def _plan_chronological(checkpoint: int, n: int, previous: Optional[_CheckpointPlan]) -> _CheckpointPlan:
    """Rows 0..n-1 as they are; consecutive checkpoint numbers continue each other."""
    if previous is None:
        link = "start" if checkpoint == 0 else "join"
    else:
        link = "continue" if checkpoint == previous.checkpoint + 1 else "join"
    return _CheckpointPlan(checkpoint, n, [(0, n)], 0, link, None, None, False)


def _check_files(src: Path, checkpoint: int, frame_spec: Optional[tuple]) -> Tuple[int, tuple]:
    """The checkpoint's row count and frame spec, from its store files' headers (checked to agree)."""
    headers = {}
    for key in _STORE_KEYS:
        headers[key] = _NpyRows(_store_path(src, key, checkpoint))
        headers[key].close()
    observations = headers["observation"]
    n, spec = observations.shape[0], (tuple(observations.shape[1:]), observations.dtype)
    if frame_spec is not None and spec != frame_spec:
        raise DatasetError(f"{observations.path}: frames of shape {spec[0]} {spec[1]}, earlier checkpoints had "
                           f"{frame_spec[0]} {frame_spec[1]}")
    if n < DQN_REPLAY_STACK:
        raise DatasetError(f"{observations.path}: {n} rows, too few for a buffer of {DQN_REPLAY_STACK}-frame stacks")
    for key in _SMALL_KEYS:
        if tuple(headers[key].shape) != (n,):
            raise DatasetError(f"{headers[key].path}: shape {headers[key].shape}, the observations have {n} rows")
    return n, spec


def _plan_import(src: Path, checkpoints: List[int], layout: str) -> Tuple[List[_CheckpointPlan], tuple]:
    """Every checkpoint's plan and the frame spec, so that what the files' headers and add
    counts already refuse is refused before the destination is touched."""
    plans: List[_CheckpointPlan] = []
    frame_spec = None
    for checkpoint in checkpoints:
        n, frame_spec = _check_files(src, checkpoint, frame_spec)
        previous = plans[-1] if plans else None
        plans.append(_plan_chronological(checkpoint, n, previous) if layout == "chronological"
                     else _plan_logged(src, checkpoint, n, previous))
    return plans, frame_spec


class _CheckpointFeed:
    """Feeds one checkpoint's new rows, oldest first, to the converter.

    Rows the previous checkpoint also held (the plan's overlap) are compared with it, not
    fed: all their actions, rewards and terminals up front, and the newest
    `_COMPARED_FRAMES` frames as they stream by. The converter is linked to what came
    before (episode start, continuation, or a join at the next episode start) at the first
    new row, once the comparison is complete. The newest frames are kept for the next
    checkpoint's comparison.
    """

    def __init__(self, src: Path, plan: _CheckpointPlan, previous: Optional["_CheckpointFeed"],
                 convert: _DopamineEpisodes, num_actions: int):
        self.plan, self._previous, self._convert = plan, previous, convert
        self.path = _store_path(src, "observation", plan.checkpoint)
        self.small = {key: _load_small(_store_path(src, key, plan.checkpoint)) for key in _SMALL_KEYS}
        for key, array in self.small.items():
            if array.shape != (plan.rows,):
                raise DatasetError(f"{_store_path(src, key, plan.checkpoint)}: shape {array.shape}, "
                                   f"the observations have {plan.rows} rows")
        self._order = plan.order()
        actions = self.small["action"][self._order].astype(np.int64)  # never the unwritten rows
        if len(actions) and (actions.min() < 0 or actions.max() >= num_actions):
            raise DatasetError(f"{_store_path(src, 'action', plan.checkpoint)}: actions outside [0, {num_actions})")
        self._terminals = self.small["terminal"][self._order] != 0
        # "<file>: row r" of the first shared row that differs from the previous checkpoint's
        self.mismatch = self._compare_small(src)
        self.tail: List[np.ndarray] = []  # the newest frames, oldest first
        self.joined = False
        self._linked = False
        self._position = 0

    def _compare_small(self, src: Path) -> Optional[str]:
        if not self.plan.overlap:
            return None
        shared = self._order[:self.plan.overlap]
        for key in _SMALL_KEYS:
            differ = np.flatnonzero(self.small[key][shared] != self._previous.small[key][shared])
            if len(differ):
                return f"{_store_path(src, key, self.plan.checkpoint)}: row {shared[differ[0]]}"
        return None

    def run(self, chunk_rows: int) -> int:
        """Feeds the checkpoint; returns how many new rows it had."""
        first = 0
        for lo, hi in self.plan.segments:
            frames = self._frames(lo, hi, first, chunk_rows)
            try:
                for row, frame in zip(range(lo, hi), frames):
                    self._row(row, frame)
            finally:
                frames.close()
            first += hi - lo
        if not self._linked:
            self._link()
        self._previous = None  # the next checkpoint compares with this one only
        return len(self._order) - self.plan.overlap

    def _frames(self, lo: int, hi: int, first: int, chunk_rows: int) -> Iterator[Optional[np.ndarray]]:
        """Frames of rows lo..hi-1 (at positions first..), or None where none is needed."""
        if not self._needs_frames(first, first + hi - lo):
            yield from itertools.repeat(None, hi - lo)
            return
        rows = _NpyRows(self.path)
        try:
            for _ in rows.chunks(lo, chunk_rows):  # gzip has no random access: decompress the rows before
                pass
            for chunk in rows.chunks(hi - lo, chunk_rows):
                yield from chunk
        finally:
            rows.close()

    def _needs_frames(self, first: int, end: int) -> bool:
        """Whether positions first..end-1 need frames: to compare, to keep for the next
        checkpoint, or to feed anything but rows skipped up to an episode start."""
        overlap, total = self.plan.overlap, len(self._order)
        if self.mismatch is None and first < overlap and end > overlap - self._compared_frames():
            return True
        if end > total - _COMPARED_FRAMES:
            return True
        fed = max(first, overlap)
        if fed >= end:
            return False
        if self._linked:
            skipping = not self._convert.needs_frames
        elif self.mismatch is not None or self.plan.link == "join":
            skipping = True
        else:
            skipping = self.plan.link == "continue" and not self._convert.needs_frames
        # Skipping lasts up to a terminal; the padding rows after it are checked on their frames.
        return not skipping or bool(self._terminals[fed:end - 1].any())

    def _compared_frames(self) -> int:
        kept = len(self._previous.tail) if self._previous is not None else 0
        return min(_COMPARED_FRAMES, self.plan.overlap, kept)

    def _row(self, row: int, frame: Optional[np.ndarray]) -> None:
        position = self._position
        self._position += 1
        if position < self.plan.overlap:
            self._compare_frame(position, row, frame)
        else:
            if not self._linked:
                self._link()
            self._convert.row(frame, int(self.small["action"][row]), float(self.small["reward"][row]),
                              bool(self._terminals[position]), f"{self.path} row {row}")
        if position >= len(self._order) - _COMPARED_FRAMES:
            self.tail.append(np.array(frame))  # a copy, so the chunk it views is let go

    def _compare_frame(self, position: int, row: int, frame: Optional[np.ndarray]) -> None:
        kept = self._previous.tail if self._previous is not None else []
        index = position - self.plan.overlap + len(kept)  # the same add in the previous checkpoint
        if self.mismatch is None and frame is not None and index >= 0 and not np.array_equal(frame, kept[index]):
            self.mismatch = f"{self.path}: row {row}"

    def _link(self) -> None:
        self._linked = True
        plan = self.plan
        if self.mismatch is not None and not plan.final:
            before = self._previous.plan
            raise DatasetError(f"{self.mismatch} differs from checkpoint {before.checkpoint}, although the add "
                               f"counts ({before.add_count}, then {plan.add_count}) say that save left it unchanged: "
                               f"not the same run?")
        if self.mismatch is not None or plan.link == "join":
            # Logs were skipped before this final one, there is a gap, or the import begins
            # mid-run: rows up to the next episode start have no known predecessor.
            self.joined = True
            self._convert.cut()
        elif plan.link == "start":
            self._convert.expect_episode_start()


@contextlib.contextmanager
def _undone_on_error(path: Path) -> Iterator[None]:
    """Removes what the block wrote at `path` if it raises: the directories it created, or,
    where `path` already was a directory, the entries it added. A refused import leaves no
    half-written dataset behind."""
    path = Path(os.path.abspath(path))
    created = next((p for p in reversed([path, *path.parents]) if not p.exists()), None)
    if created is None and not path.is_dir():
        raise DatasetError(f"{path}: exists and is not a directory")
    before = set(os.listdir(path)) if created is None else set()
    try:
        yield
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        else:
            for name in set(os.listdir(path)) - before:
                entry = path / name
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        raise


def _find_checkpoints(src_dir: Union[str, Path], checkpoints: Optional[List[int]]) -> Tuple[Path, List[int]]:
    """The replay_logs directory (`src_dir` or its `replay_logs`) and the checkpoints to import, all present."""
    src = Path(src_dir)
    if not dqn_replay_checkpoints(src) and dqn_replay_checkpoints(src / "replay_logs"):
        src = src / "replay_logs"
    checkpoints = sorted(set(dqn_replay_checkpoints(src) if checkpoints is None else checkpoints))
    if not checkpoints:
        raise DatasetError(f"{src}: no Dopamine replay checkpoints ($store$_observation_ckpt.N.gz and friends)")
    for checkpoint in checkpoints:
        for key in _STORE_KEYS:
            if not _store_path(src, key, checkpoint).is_file():
                raise DatasetError(f"{_store_path(src, key, checkpoint)}: missing (checkpoint {checkpoint})")
    return src, checkpoints


def import_dqn_replay(src_dir: Union[str, Path], dst_dir: Union[str, Path], checkpoints: Optional[List[int]] = None,
                      env_id: str = "Pong", *, num_actions: Optional[int] = None, layout: str = "logged",
                      shard_size: int = DEFAULT_SHARD_SIZE, chunk_rows: int = 10_000,
                      compress: bool = True) -> Dict[str, Any]:
    """Converts Dopamine replay logs of one game/run (`$store$_*_ckpt.N.gz`) into a dataset
    (atari, `env_id`, preset dopamine, frame_stack 4), one checkpoint at a time; returns
    the provenance record also stored as `source` in meta.json.

    `layout="logged"` reads checkpoints as Dopamine saved them (batch_rl's logs of the DQN
    Replay Dataset, or Dopamine's own saves; see the comment above), using
    `add_count_ckpt.N.gz` when present: a checkpoint continues the previous imported one
    when no add in between was lost, and only its new rows are imported; the rows it
    shares with the previous one are compared, and must be unchanged (for a final log,
    changed rows mean skipped logs). `"chronological"` takes rows 0..n-1 as they are, and
    consecutive numbers as continuing each other. A checkpoint that does not continue the
    previous imported one (nor begins the run) starts at its first episode start (earlier
    rows are skipped), and an episode whose continuation is not imported is cut at its last
    observation (its last step is dropped). Nothing may follow a final log. Rewards are
    stored as logged, i.e. clipped to [-1, 1] by Dopamine's runner (`rewards_clipped:
    true`); `terminal == 1` (game over or Dopamine's episode cap) becomes a terminal.
    `num_actions` defaults to the env's minimal action set (needs ale-py).

    A refused import raises `DatasetError` (one line naming the file) and leaves `dst_dir`
    as it was: removed if this import created it.

    Memory: a checkpoint's action, reward and terminal arrays whole (~9 MB for 1M steps),
    `chunk_rows` observation frames (70 MB at 10k 84x84 frames), and the writer's open
    shard (`shard_size` frames: 0.7 GB at 100k). A checkpoint whose oldest row is not row 0
    is decompressed twice (gzip has no random access).
    """
    if layout not in DQN_REPLAY_LAYOUTS:
        raise DatasetError(f"layout: unknown value {layout!r} (valid: {', '.join(DQN_REPLAY_LAYOUTS)})")
    src, checkpoints = _find_checkpoints(src_dir, checkpoints)
    env = {"kind": "atari", "id": env_id, "preset": "dopamine"}
    if num_actions is None:
        from types import SimpleNamespace

        from envs.factory import env_spec
        num_actions = env_spec(SimpleNamespace(**env, max_episode_frames=108_000)).num_actions
    plans, frame_spec = _plan_import(src, checkpoints, layout)
    dst = Path(dst_dir)
    if (dst / META_FILE).exists():
        raise DatasetError(f"{dst}: already holds a dataset ({META_FILE}); pick a new directory")
    source = {"kind": "dqn-replay", "reference": "Agarwal, Schuurmans & Norouzi 2020 (Dopamine replay logs)",
              "src": str(src), "checkpoints": checkpoints, "layout": layout,
              "final_frames": "zero: Dopamine does not log the observation after an episode's last step"}
    with _undone_on_error(dst):
        writer = DatasetWriter(dst, env=env, frame_shape=frame_spec[0], frame_dtype=frame_spec[1],
                               frame_stack=DQN_REPLAY_STACK, num_actions=num_actions,
                               agent={"name": "Dopamine DQN (DQN Replay Dataset)"}, shard_size=shard_size,
                               compress=compress, rewards_clipped=True, source=source)
        convert = _DopamineEpisodes(writer, frame_spec[0], frame_spec[1], DQN_REPLAY_STACK)
        rows, joined, previous = 0, [], None
        for plan in plans:
            feed = _CheckpointFeed(src, plan, previous, convert, num_actions)
            rows += feed.run(chunk_rows)
            joined += [plan.checkpoint] if feed.joined else []
            previous = feed
        convert.cut()
        source.update(rows_read=rows, skipped_rows=convert.skipped_rows, cut_steps=convert.cut_steps,
                      joined=joined)
        writer.set_source(source)  # the counts are known only now; close() writes them
        writer.close()
    return source
