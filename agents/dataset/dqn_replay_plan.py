"""Reading and planning an import of the DQN Replay Dataset (Dopamine replay logs,
Agarwal et al. 2020): the store files (`$store$_<key>_ckpt.N.gz`, gzipped `.npy` read
whole or in row chunks), the checkpoints present, and each checkpoint's `_CheckpointPlan`
(which rows hold its adds, which it shares with the previous one, how it links to it),
decided from file headers and add counts before any row is read.

dqn_replay.py feeds the planned rows into a `DatasetWriter`.
"""
from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from .format import DatasetError

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
    # Only a final log read alone lacks an add count, and nothing may follow a final log.
    before = previous.add_count
    assert before is not None
    # A cursor (stored < n) stands for the smallest add count it allows after the previous save.
    count = stored if stored >= n else before + (stored - before) % n
    if count < before:
        raise DatasetError(f"{path}: add_count {stored} is below checkpoint {previous.checkpoint}'s "
                           f"{before}: not the same run, or not in order")
    shared = before - max(count - n, 0)  # < 0: the adds in between are in neither save
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
    frame_spec: Optional[tuple] = None
    for checkpoint in checkpoints:
        n, frame_spec = _check_files(src, checkpoint, frame_spec)
        previous = plans[-1] if plans else None
        plans.append(_plan_chronological(checkpoint, n, previous) if layout == "chronological"
                     else _plan_logged(src, checkpoint, n, previous))
    assert frame_spec is not None, "_find_checkpoints never returns an empty list"
    return plans, frame_spec


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
