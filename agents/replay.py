"""Replay through Reverb: the tables, the n-step transition adder, the batch stream.

Storage layout. The adder appends one row per env step to a Reverb
TrajectoryWriter, in one column per env. A row is bytes: the newest single
frame of the observation (for Atari one 84×84 frame, not the stack) followed by
the packed (action, n-step return, discount, steps) of the transition that
ends at this row, as four float32 (zeros where no transition ends). An item is
one window of stack + n consecutive rows of its env's column: the frames of
both observations and, in its last row, its transition. Reverb decodes cells
of one column that lie in one chunk as one slice, so an item usually costs one
chunk decode and copy when sampled, where an item of separate obs, next_obs and
transition cells cost three (sampling alone 1.6-2.0 × the items/s;
benchmarks/README.md, note 1). Consecutive items share their rows, so a stacked
observation costs nothing extra.

An episode starts with the older frames of the reset observation's stack as
rows of their own, so every stack is exactly what the env showed and no frame
of the previous episode can leak into it. After its last step come rows that
repeat the final frame, one for each transition that starts fewer than n steps
before the end, so that every item has its full window; such a transition
bootstraps from the observation `steps` (m < n) rows after its own, which the
learner picks out of the window (`ItemLayout.to_transition`).

Item structure (the table signature):
  rows  [stack + n, frame bytes + 16]  uint8
        rows 0 .. stack-1 are the frames of obs (t-stack+1 .. t), rows m .. m+stack-1
        those of next_obs (t+m-stack+1 .. t+m); the last row ends with
        (a_t, exact in float32 for any action count an env has;
         r_t + γ r_{t+1} + ... with m ≤ n terms, stopping at a terminal;
         γ^m, or 0 when the episode terminated within the m steps;
         m) as float32
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import reverb

from eosrl.agents import layout
# The layout and the writer-independent adder live in agents/layout.py (no Reverb, no
# TensorFlow there: the offline device path imports them alone); named here as before.
from eosrl.agents.layout import ITEM_FIELDS, TRANSITION_FIELDS, ItemLayout  # noqa: F401

REPLAY_TABLE = "replay"
PARAMS_TABLE = "params"
PROBE_TABLE = "probe_snapshots"
# Items a writer may have unconfirmed: Reverb logs "the number of pending items is alarmingly
# high" at 50 (every 10th time), which a window of 64 reached between waits (513 warnings in
# one 20k-step launch); waits come every half window, so the count peaks at this value.
MAX_IN_FLIGHT_ITEMS = 40
# Items `batch_stream` draws from the Reverb dataset at a time, at least (whole batches).
ITEMS_PER_DRAW = 256


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
    never waits, and nothing is evicted. One place more than `max_queued` is kept for the
    learner's end marker, which therefore never waits for the prober either."""
    return reverb.Table(name=PROBE_TABLE, sampler=reverb.selectors.Fifo(), remover=reverb.selectors.Fifo(),
                        max_size=max_queued + 1, rate_limiter=reverb.rate_limiters.MinSize(1))


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
    shared by the adders of an actor's envs: column i holds the rows of env i. Each env
    needs a column of its own because Reverb encodes an item's cells in one chunk as one
    slice from the first of them (`MergeAdjacent`): a window whose rows had another
    env's rows between them would read those.

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

    def create_item(self, window: List[Any]) -> None:
        """An item from the cell references of its rows."""
        self.cells.CreateItem(self._table, 1.0, [window], [False])
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

    def close(self) -> None:
        self._writer.close()  # idempotent: the adders sharing a writer each close it


def _keep_alive(envs: int, n_step: int, frame_stack: int, max_in_flight_items: int) -> int:
    """Cells each column of a writer for `envs` envs keeps referable, which also caps
    the length of Reverb's auto-tuned chunks; an item goes to the server only once its
    chunks are complete. An item's oldest row is n + stack - 1 rows back in its env's
    column (the newest in the others): n + stack is the least that works. An env's
    chunk of L rows completes up to (L - 1)·envs items after an item in it; under half a
    wait window, the waits seldom find items the server has not confirmed. Within those
    bounds 2n + 2·stack + 2 (what one env gets): longer chunks cost less to make and
    compress better (benchmarks/README.md, note 4)."""
    half_window = max(1, max_in_flight_items // 2)
    return max(n_step + frame_stack, min(2 * n_step + 2 * frame_stack + 2, (half_window - 1) // envs + 1))


class TransitionAdder(layout.TransitionAdder):
    """Writes n-step transitions of one actor's episodes into the replay table.

    An `Adder` (agents/types.py): `add_first(obs)` after a reset, `add(action,
    reward, terminated, truncated, next_obs, life_loss)` after each step. A
    termination or a life loss (reported by the env under the Nature preset)
    ends bootstrapping; a termination or a truncation ends the stream.

    The adders `for_envs` makes (the envs of a vectorised actor) share one writer, so
    one gRPC stream and one writer thread carry all their items. An episode's end
    neither waits for the server nor ends the Reverb episode (which would flush every
    env's pending rows): the adders keep their episodes apart themselves (no item
    references a row of another episode, and each env has its own column), the waits
    every half-window bound the unconfirmed items, and an episode's last items follow
    with the next rows' chunks or at the next wait. A lone adder does the same:
    waiting for the server at each episode's end was ~6 % of `eosrl train`'s
    main-thread samples in a py-spy profile on MinAtar, whose episodes are short
    (benchmarks/README.md, note 5).
    """

    def __init__(self, client: Optional[reverb.Client], n_step: int, discount: float, frame_stack: int,
                 table: str = REPLAY_TABLE, max_in_flight_items: int = MAX_IN_FLIGHT_ITEMS,
                 _writer: Any = None, _env: int = 0):
        super().__init__(_writer or _CellWriter(client, table, max_in_flight_items,
                                                _keep_alive(1, n_step, frame_stack, max_in_flight_items)),
                         n_step, discount, frame_stack, _env)

    @classmethod
    def for_envs(cls, client: reverb.Client, envs: int, n_step: int, discount: float, frame_stack: int,
                 table: str = REPLAY_TABLE, max_in_flight_items: int = MAX_IN_FLIGHT_ITEMS) -> List["TransitionAdder"]:
        """One adder per env of a vectorised actor, all writing through one Reverb writer
        (whose items, and so each env's, reach the table in the order they were made)."""
        writer = _CellWriter(client, table, max_in_flight_items,
                             _keep_alive(envs, n_step, frame_stack, max_in_flight_items))
        return [cls(client, n_step, discount, frame_stack, table, max_in_flight_items, _writer=writer, _env=env)
                for env in range(envs)]


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
