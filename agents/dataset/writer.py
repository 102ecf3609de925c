"""`DatasetWriter`: streams an agent's episodes (or an importer's rows) into a dataset
directory, one shard file per `shard_size` rows, each written atomically and followed by
an atomic rewrite of `meta.json`, so a crash loses at most the open shard.

`_ShardBuffer` holds the open shard's rows in memory; return statistics per shard are
`_Moments` (format.py).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .format import (DEFAULT_SHARD_SIZE, FORMAT_NAME, FORMAT_VERSION, MAX_REWARD_VALUES, META_FILE, ROW_FIELDS,
                     DatasetError, _atomic_write_text, _describe_env, _env_identity, _fsync_dir, _load_meta,
                     _Moments, _now, _same_env, _sha256, shard_name)


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
        from eosrl.envs.factory import env_spec
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
        assert self._pending is not None  # callers end only an open episode
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
