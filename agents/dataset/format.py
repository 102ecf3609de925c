"""The on-disk format of an eosrl dataset: its constants (row fields, `meta.json`,
version, shard naming), `DatasetError`, durable writes, `meta.json` loading, env identity
and the return statistics stored per shard.

docs/dataset_format.md specifies the layout; the writer, reader and importers of this
package all follow what this module defines.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np

FORMAT_NAME = "eosrl-dataset"
FORMAT_VERSION = 1
META_FILE = "meta.json"
DEFAULT_SHARD_SIZE = 100_000
# Distinct reward values tracked for reward corruption; beyond this the set is dropped
# (continuous rewards have no meaningful "observed set").
MAX_REWARD_VALUES = 64
VERIFY_MODES = ("open", "lazy", "none")

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
        from eosrl.envs.factory import game_key
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
        # Both hold values, so both have a min and a max.
        assert self.min is not None and self.max is not None
        assert other.min is not None and other.max is not None
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
# Reading meta.json.

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
