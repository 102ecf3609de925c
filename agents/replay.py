"""Replay through Reverb: the tables, the n-step transition adder, the batch stream.

Storage layout. The adder appends one row per env step to a Reverb
TrajectoryWriter. A row holds the newest single frame of the observation
(for Atari one 84×84 frame, not the stack) and, once known, the n-step
action/return/discount of the transition that started n steps earlier. An
item references the frames of both observations by cell, so a stacked
observation costs nothing extra: consecutive items share their frames.
An episode starts with the older frames of the reset observation's stack as
rows of their own, so every stack is exactly what the env showed and no
frame of the previous episode can leak into it. (Reverb cannot reference one
cell twice in an item, so the padding cannot be repeated references.)

Item structure (the table signature):
  obs       [stack, *frame]   frames t-stack+1 .. t
  action    []  int32         a_t
  reward    []  float32       r_t + γ r_{t+1} + ... (m ≤ n terms, stops at a terminal)
  discount  []  float32       γ^m, or 0 when the episode terminated within the m steps
  next_obs  [stack, *frame]   frames t+m-stack+1 .. t+m
"""
from __future__ import annotations

import collections
import os
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence

import jax.numpy as jnp
import numpy as np
import reverb
import tensorflow as tf

from eosrl.agents.types import Transition

REPLAY_TABLE = "replay"
# The signature's fields in its flat order (sorted keys, as tree.flatten orders a dict),
# and which of them are one squeezed cell (a scalar) rather than a sequence of frames.
ITEM_FIELDS = ("action", "discount", "next_obs", "obs", "reward")
_SQUEEZED = [field not in ("obs", "next_obs") for field in ITEM_FIELDS]
PARAMS_TABLE = "params"
PROBE_TABLE = "probe_snapshots"
# Items a writer may have unconfirmed: Reverb logs "the number of pending items is alarmingly
# high" at 50 (every 10th time), which a window of 64 reached between waits (513 warnings in
# one 20k-step launch); waits come every half window, so the count peaks at this value.
MAX_IN_FLIGHT_ITEMS = 40


def item_signature(frame_shape: Sequence[int], frame_dtype, frame_stack: int) -> Dict[str, tf.TensorSpec]:
    obs = tf.TensorSpec((frame_stack,) + tuple(frame_shape), tf.as_dtype(np.dtype(frame_dtype)))
    return {
        "obs": obs,
        "action": tf.TensorSpec((), tf.int32),
        "reward": tf.TensorSpec((), tf.float32),
        "discount": tf.TensorSpec((), tf.float32),
        "next_obs": obs,
    }


def replay_table(capacity: int, min_size: int, signature,
                 samples_per_insert: Optional[float] = None,
                 error_buffer: Optional[float] = None, name: str = REPLAY_TABLE) -> reverb.Table:
    """Uniform sampling, FIFO removal. With `samples_per_insert` a
    SampleToInsertRatio limiter fixes how many samples the learner may draw per
    inserted transition, so results do not depend on which process runs faster."""
    if samples_per_insert is None:
        limiter = reverb.rate_limiters.MinSize(min_size)
    else:
        # Slack of a few batches either way so actors and learner need not lock-step.
        buffer = error_buffer if error_buffer is not None else max(10.0 * samples_per_insert, 100.0)
        limiter = reverb.rate_limiters.SampleToInsertRatio(samples_per_insert, min_size, buffer)
    return reverb.Table(name=name, sampler=reverb.selectors.Uniform(),
                        remover=reverb.selectors.Fifo(), max_size=capacity,
                        rate_limiter=limiter, signature=signature)


def params_table() -> reverb.Table:
    """One item: the latest learner parameters (and the learner step)."""
    return reverb.Table(name=PARAMS_TABLE, sampler=reverb.selectors.Lifo(),
                        remover=reverb.selectors.Fifo(), max_size=1,
                        rate_limiter=reverb.rate_limiters.MinSize(1))


def probe_table(max_queued: int) -> reverb.Table:
    """The learner's snapshots waiting for the prober (`probe.mode: process`), oldest
    first. The prober deletes a snapshot only once its record is written, so one it was
    measuring when it died is still there for the prober that restarts. The learner
    checks the size before inserting and skips a snapshot when the queue is full: it
    never waits, and nothing is evicted."""
    return reverb.Table(name=PROBE_TABLE, sampler=reverb.selectors.Fifo(), remover=reverb.selectors.Fifo(),
                        max_size=max_queued, rate_limiter=reverb.rate_limiters.MinSize(1))


def start_server(tables: List[reverb.Table], port: Optional[int] = None,
                 checkpoint_dir: Optional[str] = None) -> reverb.Server:
    """A Reverb server; with `checkpoint_dir` it reloads the newest table checkpoint there."""
    checkpointer = None
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        checkpointer = reverb.checkpointers.DefaultCheckpointer(path=checkpoint_dir)
    return reverb.Server(tables=tables, port=port, checkpointer=checkpointer)


class TransitionAdder:
    """Writes n-step transitions of one actor's episodes into the replay table.

    An `Adder` (agents/types.py): `add_first(obs)` after a reset, `add(action,
    reward, terminated, truncated, next_obs, life_loss)` after each step. A
    termination or a life loss (reported by the env under the Nature preset)
    ends bootstrapping; a termination or a truncation ends the stream.
    """

    def __init__(self, client: reverb.Client, n_step: int, discount: float, frame_stack: int,
                 table: str = REPLAY_TABLE, max_in_flight_items: int = MAX_IN_FLIGHT_ITEMS):
        self._n = n_step
        self._gamma = discount
        self._stack = frame_stack
        self._table = table
        # create_item never blocks; waiting for confirmations is what lets the
        # table's rate limiter hold a distributed actor back, and what keeps the
        # writer's pending items under the level at which Reverb floods its log.
        self._max_in_flight = max_in_flight_items
        # Oldest referenced row is at most (n-1) transition-only rows + n + stack rows back.
        self._writer = client.trajectory_writer(num_keep_alive_refs=2 * n_step + 2 * frame_stack + 2)
        # Rows and items go straight to the writer's C++ half in flat columns: the Python
        # wrapper re-flattens each row and rebuilds its whole history structure for each
        # item, ~150 µs per env step, half of a MinAtar actor's time (benchmarks note 2).
        # Columns: 0 frame, 1 action, 2 reward, 3 discount.
        self._cells = self._writer._writer  # dm-reverb 0.14's pybind TrajectoryWriter
        # Cell references of the newest frames; the oldest an item uses is n + stack - 1 back.
        self._frames: Deque = collections.deque(maxlen=n_step + frame_stack)
        self._row = -1                    # step index t of the last observation in this episode
        self._actions: List[int] = []
        self._rewards: List[float] = []
        self._continues: List[float] = []  # 0 where bootstrapping stops
        self.items_written = 0

    def _frame(self, obs: np.ndarray) -> np.ndarray:
        return obs[..., -1] if self._stack > 1 else obs

    def _append(self, frame: Optional[np.ndarray], transition: Sequence = (None, None, None)) -> List[Any]:
        """One row: a frame and/or the (action, n-step return, discount) of a transition;
        returns the cells of the transition's three fields."""
        refs = self._cells.Append([frame, *transition])
        if frame is not None:
            self._frames.append(refs[0])
        return refs[1:]

    def _stack_refs(self, t: int) -> List[Any]:
        """Cells of the frames of the observation at step t: rows t .. t+stack-1 counting the
        stack-1 padding rows, of which the deque holds the newest, row self._row + stack - 1."""
        first = len(self._frames) - self._stack - self._row  # deque position of row 0
        return [self._frames[first + t + i] for i in range(self._stack)]

    def add_first(self, obs: np.ndarray) -> None:
        self._frames.clear()
        for i in range(self._stack - 1):
            self._append(obs[..., i])
        self._append(self._frame(obs))
        self._row = 0
        self._actions, self._rewards, self._continues = [], [], []

    def _n_step(self, start: int, end: int):
        """Return and bootstrap discount of the transition from row `start` to row `end`."""
        ret, scale = 0.0, 1.0
        for t in range(start, end):
            ret += scale * self._rewards[t]
            scale *= self._gamma * self._continues[t]
        return np.float32(ret), np.float32(scale)

    def _create_item(self, start: int, end: int, transition: List[Any]) -> None:
        """The item from step `start` to step `end`, with the cells `_append` returned."""
        action, reward, discount = transition
        # In ITEM_FIELDS order: action, discount, next_obs, obs, reward.
        self._cells.CreateItem(self._table, 1.0, [[action], [discount], self._stack_refs(end),
                                                  self._stack_refs(start), [reward]], _SQUEEZED)
        self.items_written += 1
        # Waiting on every item would cost a server round trip per env step; every
        # half-window keeps at most max_in_flight items unconfirmed all the same.
        if self.items_written % max(1, self._max_in_flight // 2) == 0:
            self._wait(self._max_in_flight // 2)

    def _wait(self, block_until_num_items: int) -> None:
        """Waits for the server in short slices, so a SIGTERM handler gets to run
        even while the rate limiter holds inserts back."""
        while True:
            try:
                self._writer.flush(block_until_num_items, timeout_ms=1000)
                return
            except reverb.errors.DeadlineExceededError:
                continue

    def add(self, action: int, reward: float, terminated: bool, truncated: bool, next_obs: np.ndarray,
            life_loss: bool = False) -> None:
        episode_over = terminated or truncated
        self._actions.append(int(action))
        self._rewards.append(float(reward))
        self._continues.append(0.0 if terminated or life_loss else 1.0)
        self._row += 1
        start = self._row - self._n
        # A terminal inside the window makes later frames irrelevant, but the
        # bootstrap discount is then 0, so the same item layout stays correct.
        if start >= 0:
            transition = self._append(self._frame(next_obs), (np.int32(self._actions[start]),
                                                              *self._n_step(start, self._row)))
            self._create_item(start, self._row, transition)
        else:
            self._append(self._frame(next_obs))
        if episode_over:
            # Transitions that started fewer than n steps before the end bootstrap
            # (or not, after a terminal) from the final observation.
            for start in range(max(0, self._row - self._n + 1), self._row):
                transition = self._append(None, (np.int32(self._actions[start]),
                                                 *self._n_step(start, self._row)))
                self._create_item(start, self._row, transition)
            self._wait(0)
            self._writer.end_episode(clear_buffers=True)
            self._row = -1

    def flush(self) -> None:
        self._wait(0)

    def close(self) -> None:
        self._writer.close()


def item_to_transition(frame_stack: int):
    """Maps a batch of items to `Transition`s with observations as the env gives them."""

    def convert(data: Dict[str, Any]) -> Transition:
        def stacked(frames):
            # [B, stack, *frame] -> [B, *frame, stack] (Atari) or [B, *obs] (no stack).
            return frames[:, 0] if frame_stack == 1 else jnp.moveaxis(frames, 1, -1)
        return Transition(obs=stacked(data["obs"]), action=data["action"],
                          reward=data["reward"], discount=data["discount"],
                          next_obs=stacked(data["next_obs"]))

    return convert


def batch_stream(address: str, batch_size: int, table: str = REPLAY_TABLE,
                 prefetch: int = 2, rate_limiter_timeout_ms: int = -1) -> DevicePrefetch:
    """Batches of items from a prefetching Reverb dataset (sampling runs in background
    threads), put on the device ahead of use. With a timeout, the stream ends when the
    rate limiter has held sampling back that long."""
    dataset = reverb.TrajectoryDataset.from_table_signature(
        server_address=address, table=table,
        max_in_flight_samples_per_worker=2 * batch_size,
        rate_limiter_timeout_ms=rate_limiter_timeout_ms)
    # Batch before dropping the sample info: one map call per batch instead of per item
    # doubles the batches/s the iterator delivers (MinAtar, batch 32: ~1000 -> ~2000/s).
    dataset = dataset.batch(batch_size, drop_remainder=True)
    dataset = dataset.map(lambda sample: sample.data).prefetch(prefetch)
    return DevicePrefetch(dataset.as_numpy_iterator())


def sample_items(client: reverb.Client, count: int, signature: Dict[str, Any],
                 table: str = REPLAY_TABLE) -> Dict[str, np.ndarray]:
    """`count` items stacked into one batch by direct sampling (probe batches,
    tests); training batches come from the prefetching `batch_stream`."""
    keys = sorted(signature)  # the flat order of a dict's leaves
    rows = [sample.data for sample in client.sample(table, num_samples=count, emit_timesteps=False)]
    return {key: np.stack([row[i] for row in rows]) for i, key in enumerate(keys)}


class DevicePrefetch:
    """Moves the next `size` batches to the device in a background thread, so the
    host-side sampling and copying overlap the (asynchronously dispatched) update."""

    def __init__(self, iterator: Iterator, size: int = 2):
        import queue
        import threading
        self._queue: "queue.Queue" = queue.Queue(maxsize=size)
        self._iterator = iterator
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _put(self, item) -> None:
        import queue
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        import jax
        try:
            for batch in self._iterator:
                if self._stop.is_set():
                    return
                self._put(jax.device_put(batch))
        except Exception as e:  # surfaced to the consumer instead of dying silently
            self._put(e)
            return
        self._put(StopIteration())

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if isinstance(item, StopIteration):
            raise StopIteration
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        """Stops the thread (call before the server goes away)."""
        import queue
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)


def table_size(client: reverb.Client, table: str = REPLAY_TABLE, timeout: Optional[int] = None) -> int:
    """Items in `table`; with `timeout` (seconds) a dead server raises instead of blocking."""
    return int(client.server_info(timeout=timeout)[table].current_size)
