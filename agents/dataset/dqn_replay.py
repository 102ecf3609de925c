"""`import_dqn_replay`: converts the DQN Replay Dataset (Dopamine replay logs, Agarwal et
al. 2020) of one game/run into an eosrl dataset, checkpoint by checkpoint, streaming the
observation arrays in chunks. `_CheckpointFeed` feeds one checkpoint's new rows (as
planned in dqn_replay_plan.py) and compares the rows it shares with the previous one;
`_DopamineEpisodes` turns Dopamine's rows into `DatasetWriter` calls.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Generator, Iterator, List, Optional, Tuple, Union

import numpy as np

from .dqn_replay_plan import (DQN_REPLAY_LAYOUTS, DQN_REPLAY_STACK, _SMALL_KEYS, _CheckpointPlan,
                              _find_checkpoints, _load_small, _NpyRows, _plan_import, _store_path)
from .format import DEFAULT_SHARD_SIZE, META_FILE, DatasetError
from .writer import DatasetWriter

# Where two checkpoints hold the same rows, all their actions, rewards and terminals are
# compared, and this many of the newest frames (kept in memory from the earlier one).
_COMPARED_FRAMES = 64


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

    def row(self, frame: Optional[np.ndarray], action: int, reward: float, terminal: bool, where: str) -> None:
        """One row; `frame` may be None only while skipping (`needs_frames` is False)."""
        if self._state == "skip":
            # The episode began in a checkpoint that was not imported: wait for its end.
            self.skipped_rows += 1
            if terminal:
                self.expect_episode_start()
            return
        assert frame is not None, f"{where}: no frame read for a row the converter needs"
        if self._state == "padding" and len(self._pad_frames) < self._pad:
            if terminal or action != 0 or reward != 0 or frame.any():
                raise DatasetError(f"{where}: expected Dopamine's zero padding row before an episode")
            self._pad_frames.append(frame)
            return
        if self._state == "padding":
            self._w.begin_episode(np.stack(self._pad_frames + [frame]))
            self._state = "episode"
        else:
            assert self._pending is not None  # every row of an open episode leaves its step pending
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
        assert self._previous is not None  # only a plan that follows a previous checkpoint shares rows
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

    def _frames(self, lo: int, hi: int, first: int,
                chunk_rows: int) -> Generator[Optional[np.ndarray], None, None]:
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
            assert self._previous is not None  # a mismatch is found comparing with the previous checkpoint
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


def import_dqn_replay(src_dir: Union[str, Path], dst_dir: Union[str, Path], checkpoints: Optional[List[int]] = None,
                      env_id: str = "Pong", *, num_actions: Optional[int] = None, layout: str = "logged",
                      shard_size: int = DEFAULT_SHARD_SIZE, chunk_rows: int = 10_000,
                      compress: bool = True) -> Dict[str, Any]:
    """Converts Dopamine replay logs of one game/run (`$store$_*_ckpt.N.gz`) into a dataset
    (atari, `env_id`, preset dopamine, frame_stack 4), one checkpoint at a time; returns
    the provenance record also stored as `source` in meta.json.

    `layout="logged"` reads checkpoints as Dopamine saved them (batch_rl's logs of the DQN
    Replay Dataset, or Dopamine's own saves; see the comment in dqn_replay_plan.py), using
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
        from eosrl.envs.config import EnvConfig
        from eosrl.envs.factory import env_spec
        num_actions = env_spec(EnvConfig(kind="atari", id=env_id, preset="dopamine",
                                         max_episode_frames=108_000)).num_actions
    plans, frame_spec = _plan_import(src, checkpoints, layout)
    dst = Path(dst_dir)
    if (dst / META_FILE).exists():
        raise DatasetError(f"{dst}: already holds a dataset ({META_FILE}); pick a new directory")
    source: Dict[str, Any] = {
        "kind": "dqn-replay", "reference": "Agarwal, Schuurmans & Norouzi 2020 (Dopamine replay logs)",
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
