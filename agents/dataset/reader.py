"""`DatasetReader`: opens a dataset directory, validates `meta.json` and the shard files
(sizes on open, sha256 checksums on open or lazily), streams `Episode`s shard by shard
(`_EpisodeAssembler` joins episodes that span shards), reports statistics and checks the
env and frames against a config.

Selecting and corrupting subsets of transitions (`select`, `corrupt`) are reader methods
inherited from `_Subsets` (regimes.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from .format import (META_FILE, ROW_FIELDS, SHARD_ARRAYS, VERIFY_MODES, DatasetError, _describe_env,
                     _env_identity, _load_meta, _Moments, _same_env, _sha256)
from .regimes import _Subsets


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


class DatasetReader(_Subsets):
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
