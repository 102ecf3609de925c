"""Replay through Reverb: the tables, the n-step transition adder, the batch stream.

Storage layout. The adder appends one row per env step to a Reverb
TrajectoryWriter. A row holds the newest single frame of the observation
(for Atari one 84×84 frame, not the stack) and, once known, the n-step
(action, return, discount) of the transition that started n steps earlier,
packed in one float32 cell: each cell of an item is a chunk slice that
Reverb's sampler locates, decodes and copies on its own, so three scalar
columns cost more to sample than one (benchmarks/README.md, note 1). An
item references the frames of both observations by cell, so a stacked
observation costs nothing extra: consecutive items share their frames.
An episode starts with the older frames of the reset observation's stack as
rows of their own, so every stack is exactly what the env showed and no
frame of the previous episode can leak into it. (Reverb cannot reference one
cell twice in an item, so the padding cannot be repeated references.)

Item structure (the table signature):
  obs         [stack, *frame]   frames t-stack+1 .. t
  next_obs    [stack, *frame]   frames t+m-stack+1 .. t+m
  transition  [3]  float32      (a_t, exact in float32 for any action count an env has;
                                 r_t + γ r_{t+1} + ... with m ≤ n terms, stopping at a terminal;
                                 γ^m, or 0 when the episode terminated within the m steps)
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
ITEM_FIELDS = ("next_obs", "obs", "transition")
_SQUEEZED = [field == "transition" for field in ITEM_FIELDS]
TRANSITION_FIELDS = ("action", "reward", "discount")  # the packed cell's entries, in order
PARAMS_TABLE = "params"
PROBE_TABLE = "probe_snapshots"
# Items a writer may have unconfirmed: Reverb logs "the number of pending items is alarmingly
# high" at 50 (every 10th time), which a window of 64 reached between waits (513 warnings in
# one 20k-step launch); waits come every half window, so the count peaks at this value.
MAX_IN_FLIGHT_ITEMS = 40
# Items `batch_stream` draws from the Reverb dataset at a time, at least (whole batches).
ITEMS_PER_DRAW = 256


def item_signature(frame_shape: Sequence[int], frame_dtype, frame_stack: int) -> Dict[str, tf.TensorSpec]:
    obs = tf.TensorSpec((frame_stack,) + tuple(frame_shape), tf.as_dtype(np.dtype(frame_dtype)))
    return {"obs": obs, "next_obs": obs, "transition": tf.TensorSpec((len(TRANSITION_FIELDS),), tf.float32)}


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


class _CellWriter:
    """A Reverb TrajectoryWriter driven in flat columns, for one `TransitionAdder` or
    shared by the adders of an actor's envs: 0 the frames of the first env, 1 the
    packed transition, and 1 + i the frames of env i > 0. Each env needs a frame
    column of its own because Reverb encodes an item's cells in one chunk as one slice
    from the first of them (`MergeAdjacent`): a stack whose frames had another env's
    frames between them would read those.

    Rows and items go straight to the writer's C++ half: the Python wrapper re-flattens
    each row and rebuilds its whole history structure for each item, ~150 µs per env
    step, half of a MinAtar actor's time (benchmarks note 2). create_item never blocks;
    waiting for confirmations is what lets the table's rate limiter hold a distributed
    actor back, and what keeps the writer's pending items under the level at which
    Reverb floods its log. Waiting on every item would cost a server round trip per env
    step; a wait every half-window, counted over all the items of the writer's adders,
    keeps at most `max_in_flight_items` of them unconfirmed all the same.
    """

    def __init__(self, client: reverb.Client, table: str, max_in_flight_items: int, num_keep_alive_refs: int):
        self._table = table
        self._max_in_flight = max_in_flight_items
        self._half_window = max(1, max_in_flight_items // 2)
        self._writer = client.trajectory_writer(num_keep_alive_refs=num_keep_alive_refs)
        self.cells = self._writer._writer  # dm-reverb 0.14's pybind TrajectoryWriter
        self.items = 0

    def create_item(self, columns: List[List[Any]]) -> None:
        """An item from cell references, in ITEM_FIELDS order."""
        self.cells.CreateItem(self._table, 1.0, columns, _SQUEEZED)
        self.items += 1
        if self.items % self._half_window == 0:
            self.wait(self._max_in_flight // 2)

    def wait(self, block_until_num_items: int) -> None:
        """Waits for the server in short slices, so a SIGTERM handler gets to run
        even while the rate limiter holds inserts back."""
        while True:
            try:
                self._writer.flush(block_until_num_items, timeout_ms=1000)
                return
            except reverb.errors.DeadlineExceededError:
                continue

    def end_episode(self) -> None:
        """Waits for every item, then starts a new Reverb episode (new chunks)."""
        self.wait(0)
        self._writer.end_episode(clear_buffers=True)

    def close(self) -> None:
        self._writer.close()  # idempotent: the adders sharing a writer each close it


def _shared_keep_alive(envs: int, n_step: int, frame_stack: int, max_in_flight_items: int) -> int:
    """Cells each column of a writer shared by `envs` envs keeps referable, which also caps
    the length of Reverb's auto-tuned chunks; an item goes to the server only once its
    chunks are complete. An item's oldest cell is at most n + stack cells back in its
    env's frame column (the newest in the others): the least that works. An env's chunk
    of L frames completes up to (L - 1)·envs items after an item in it; under half a wait
    window, the waits seldom find items the server has not confirmed. Within those bounds
    the lone adder's 2n + 2·stack + 2: longer chunks cost less to make and compress better
    (benchmarks/README.md, note 4)."""
    half_window = max(1, max_in_flight_items // 2)
    return max(n_step + frame_stack, min(2 * n_step + 2 * frame_stack + 2, (half_window - 1) // envs + 1))


class TransitionAdder:
    """Writes n-step transitions of one actor's episodes into the replay table.

    An `Adder` (agents/types.py): `add_first(obs)` after a reset, `add(action,
    reward, terminated, truncated, next_obs, life_loss)` after each step. A
    termination or a life loss (reported by the env under the Nature preset)
    ends bootstrapping; a termination or a truncation ends the stream.

    A lone adder ends each Reverb episode with its own: it waits for the episode's
    items to be confirmed and starts new chunks. The adders `for_envs` makes (the envs
    of a vectorised actor) share one writer, so one gRPC stream and one writer thread
    carry all their items, and an episode's end neither waits nor ends the Reverb
    episode, which would flush every env's pending rows: the adders keep their
    episodes apart themselves (no item references a cell of another episode, and each
    env's frames have their own column), the waits every half-window still bound the
    unconfirmed items, and an episode's last items follow with the next rows' chunks
    or at the next wait.
    """

    def __init__(self, client: reverb.Client, n_step: int, discount: float, frame_stack: int,
                 table: str = REPLAY_TABLE, max_in_flight_items: int = MAX_IN_FLIGHT_ITEMS,
                 _writer: Optional[_CellWriter] = None, _env: int = 0):
        self._n = n_step
        self._gamma = discount
        self._stack = frame_stack
        self._owns_episodes = _writer is None
        # Oldest referenced row is at most (n-1) transition-only rows + n + stack rows back.
        self._writer = _writer or _CellWriter(client, table, max_in_flight_items, 2 * n_step + 2 * frame_stack + 2)
        self._cells = self._writer.cells
        # This env's frame column (_CellWriter): 0, or 1 + env after the transition's.
        self._frame_column = 0 if _env == 0 else 1 + _env
        self._padding = [None] * (self._frame_column - 2)
        # Cell references of the newest frames; the oldest an item uses is n + stack - 1 back.
        self._frames: Deque = collections.deque(maxlen=n_step + frame_stack)
        self._row = -1                    # step index t of the last observation in this episode
        self._actions: List[int] = []
        self._rewards: List[float] = []
        self._continues: List[float] = []  # 0 where bootstrapping stops
        self.items_written = 0

    @classmethod
    def for_envs(cls, client: reverb.Client, envs: int, n_step: int, discount: float, frame_stack: int,
                 table: str = REPLAY_TABLE, max_in_flight_items: int = MAX_IN_FLIGHT_ITEMS) -> List["TransitionAdder"]:
        """One adder per env of a vectorised actor, all writing through one Reverb writer
        (whose items, and so each env's, reach the table in the order they were made)."""
        writer = _CellWriter(client, table, max_in_flight_items,
                             _shared_keep_alive(envs, n_step, frame_stack, max_in_flight_items))
        return [cls(client, n_step, discount, frame_stack, table, max_in_flight_items, _writer=writer, _env=env)
                for env in range(envs)]

    def _frame(self, obs: np.ndarray) -> np.ndarray:
        return obs[..., -1] if self._stack > 1 else obs

    def _append(self, frame: Optional[np.ndarray], transition: Optional[np.ndarray] = None) -> Any:
        """One row: a frame and/or the packed (action, n-step return, discount) of a
        transition; returns the transition's cell."""
        if self._frame_column == 0:
            refs = self._cells.Append([frame, transition])
        elif frame is None:
            refs = self._cells.Append([None, transition])
        else:
            refs = self._cells.Append([None, transition, *self._padding, frame])
        if frame is not None:
            self._frames.append(refs[self._frame_column])
        return refs[1]

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

    def _transition(self, start: int, end: int) -> np.ndarray:
        """The packed (action, return, bootstrap discount) of the transition from row
        `start` to row `end`."""
        ret, scale = 0.0, 1.0
        for t in range(start, end):
            ret += scale * self._rewards[t]
            scale *= self._gamma * self._continues[t]
        return np.array([self._actions[start], ret, scale], np.float32)

    def _create_item(self, start: int, end: int, transition: Any) -> None:
        """The item from step `start` to step `end`, with the cell `_append` returned."""
        # In ITEM_FIELDS order: next_obs, obs, transition.
        self._writer.create_item([self._stack_refs(end), self._stack_refs(start), [transition]])
        self.items_written += 1

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
            transition = self._append(self._frame(next_obs), self._transition(start, self._row))
            self._create_item(start, self._row, transition)
        else:
            self._append(self._frame(next_obs))
        if episode_over:
            # Transitions that started fewer than n steps before the end bootstrap
            # (or not, after a terminal) from the final observation.
            for start in range(max(0, self._row - self._n + 1), self._row):
                transition = self._append(None, self._transition(start, self._row))
                self._create_item(start, self._row, transition)
            if self._owns_episodes:
                self._writer.end_episode()
            self._row = -1

    def flush(self) -> None:
        """Waits until the server has confirmed every item (of every adder sharing the writer)."""
        self._writer.wait(0)

    def close(self) -> None:
        self._writer.close()


def item_to_transition(frame_stack: int):
    """Maps a batch of items to `Transition`s with observations as the env gives them."""

    def convert(data: Dict[str, Any]) -> Transition:
        def stacked(frames):
            # [B, stack, *frame] -> [B, *frame, stack] (Atari) or [B, *obs] (no stack).
            return frames[:, 0] if frame_stack == 1 else jnp.moveaxis(frames, 1, -1)
        packed = data["transition"]
        return Transition(obs=stacked(data["obs"]), action=packed[:, 0].astype(jnp.int32),
                          reward=packed[:, 1], discount=packed[:, 2], next_obs=stacked(data["next_obs"]))

    return convert


def packed(action, reward, discount) -> np.ndarray:
    """The `transition` field of items with these actions, n-step returns and discounts
    (each [B] or scalars): [B, 3] float32, as the adder writes it."""
    return np.stack([np.asarray(action, np.float32), np.asarray(reward, np.float32),
                     np.asarray(discount, np.float32)], axis=-1)


def unpacked(items: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Items (one or a batch) with their packed transition as `action` (int32), `reward`
    and `discount`: a readable view for tests and inspection."""
    out = {key: value for key, value in items.items() if key != "transition"}
    packed = np.asarray(items["transition"])
    for i, field in enumerate(TRANSITION_FIELDS):
        out[field] = packed[..., i].astype(np.int32) if field == "action" else packed[..., i]
    return out


def batch_stream(address: str, batch_size: int, table: str = REPLAY_TABLE,
                 prefetch: int = 2, rate_limiter_timeout_ms: int = -1) -> "BatchStream":
    """Batches of items from a prefetching Reverb dataset (sampling and batching run in
    its C++ threads). With a timeout, the stream ends when the rate limiter has held
    sampling back that long.

    Items are sampled uniformly and independently, so small batches are drawn from the
    dataset several at a time (`ITEMS_PER_DRAW`) and split on the host: each element costs
    tf.data's Python side ~0.5 ms whatever its size, a third of a MinAtar update at batch 32."""
    batches_per_draw = max(1, ITEMS_PER_DRAW // batch_size)
    dataset = reverb.TrajectoryDataset.from_table_signature(
        server_address=address, table=table,
        max_in_flight_samples_per_worker=2 * batch_size * batches_per_draw,
        rate_limiter_timeout_ms=rate_limiter_timeout_ms)
    # Batch before dropping the sample info: one map call per batch instead of per item.
    dataset = dataset.batch(batch_size * batches_per_draw, drop_remainder=True)
    dataset = dataset.map(lambda sample: sample.data).prefetch(prefetch)
    return BatchStream(dataset.as_numpy_iterator(), batches_per_draw)


class BatchStream:
    """Training batches (numpy; the update's dispatch moves them to the device), each
    draw of the dataset split into `parts` batches without copies.

    No Python thread of its own: a thread that moved batches to the device ahead of use
    cost the fed MinAtar update 10-15 % on 2 cores (GIL and core contention with XLA),
    more than the copy it hid (benchmarks/README.md, note 1)."""

    def __init__(self, draws: Iterator[Dict[str, np.ndarray]], parts: int):
        self._draws: Optional[Iterator[Dict[str, np.ndarray]]] = draws
        self._parts = parts
        self._draw: Dict[str, np.ndarray] = {}
        self._part = parts

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        if self._draws is None:
            raise StopIteration
        if self._part == self._parts:
            self._draw, self._part = next(self._draws), 0
        size = len(next(iter(self._draw.values()))) // self._parts
        start = self._part * size
        self._part += 1
        return {key: value[start:start + size] for key, value in self._draw.items()}

    def close(self) -> None:
        """Releases the dataset's iterator (and its connection to the server)."""
        self._draws, self._draw = None, {}


def sample_items(client: reverb.Client, count: int, signature: Dict[str, Any],
                 table: str = REPLAY_TABLE) -> Dict[str, np.ndarray]:
    """`count` items stacked into one batch by direct sampling (probe batches,
    tests); training batches come from `batch_stream`."""
    keys = sorted(signature)  # the flat order of a dict's leaves
    rows = [sample.data for sample in client.sample(table, num_samples=count, emit_timesteps=False)]
    return {key: np.stack([row[i] for row in rows]) for i, key in enumerate(keys)}


def table_size(client: reverb.Client, table: str = REPLAY_TABLE, timeout: Optional[int] = None) -> int:
    """Items in `table`; with `timeout` (seconds) a dead server raises instead of blocking."""
    return int(client.server_info(timeout=timeout)[table].current_size)
