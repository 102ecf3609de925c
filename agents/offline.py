"""The offline regime's data on the device: a dataset's replay rows, loaded once into
device arrays, and a pure, jittable sampler of replay items from them.

A fixed dataset with no actor is not a replay buffer: `eosrl train` (and so the
studies) read `regime.mode: offline` from here, inside the jitted update, with the
learner's PRNG key, instead of through a Reverb table. The rows and items are
exactly those the Reverb path stores: `load` pushes the regime's selection, with its
corruption, through the same `TransitionAdder` (`Builder.load_dataset` ->
`dataset.replay_into`) into `RowArrays`, a writer that keeps each row (frame bytes
and packed transition, agents/replay.py) once in a host array and each item as the
index of its first row; `sample_items` gathers the windows of uniformly drawn items,
and the learner decodes them with `ItemLayout.to_transition` as it decodes Reverb's.
Stacks, n-step returns, discounts, episode ends, subsets and corruption therefore have
one definition for both paths.

Memory: one row per env step of the selection, plus `frame_stack - 1` padding rows at
the start of each run of selected steps and `n_step` repeats of its final frame at its
end, each of `frame bytes + 16` bytes, and a 4-byte index per item. A 1M-transition
MinAtar Breakout dataset (10×10×4 bool frames: 400 B) takes 0.42 GB; a
1M-transition Atari one (84×84 uint8 frames, stacked 4: 7,056 B) 7.08 GB.
`check_fits` refuses, before anything starts, a selection that does not fit.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from eosrl.agents import layout as item_layout
from eosrl.agents.types import Transition

_INDEX_BYTES = 4  # an item: the int32 index of its first row


class RowArrays:
    """A `TransitionAdder` writer (`TransitionAdder.into`) that keeps the rows of one
    env's column in a host array (`load` sizes it to its bound; it doubles should that
    ever fall short) and each item as its first row's index. The
    adder's window is always the newest `stack + n` rows of one episode, appended
    consecutively, so an item is one contiguous slice of rows (checked here)."""

    def __init__(self, row_bytes: int, capacity: int = 1024):
        self._rows = np.zeros((max(1, capacity), row_bytes), np.uint8)
        self._starts: list = []
        self.size = 0
        self.cells = self  # the adder appends through `cells.Append`, Reverb's name for it

    def Append(self, columns: list) -> list:  # noqa: N802 (the pybind TrajectoryWriter's name)
        (row,) = columns  # one column: this writer is one env's
        if self.size == len(self._rows):
            self._rows = np.concatenate([self._rows, np.zeros_like(self._rows)])
        self._rows[self.size] = row
        self.size += 1
        return [self.size - 1]

    def create_item(self, window: list) -> None:
        first = window[0]
        if list(window) != list(range(first, first + len(window))):
            raise AssertionError(f"an item's rows are not consecutive: {window}")
        self._starts.append(first)

    def wait(self, block_until_num_items: int) -> None:  # nothing is in flight
        pass

    def close(self) -> None:
        pass

    def arrays(self) -> Tuple[np.ndarray, np.ndarray]:
        """(rows [R, row bytes] uint8, item starts [N] int32)."""
        return self._rows[:self.size], np.asarray(self._starts, np.int32)


@jax.tree_util.register_pytree_node_class
class DeviceDataset:
    """A dataset's rows and items on the device; `layout` (static) says how to read them."""

    def __init__(self, rows: jax.Array, starts: jax.Array, layout: item_layout.ItemLayout):
        self.rows, self.starts, self.layout = rows, starts, layout

    def tree_flatten(self):
        return (self.rows, self.starts), self.layout

    @classmethod
    def tree_unflatten(cls, layout, children):
        return cls(*children, layout)

    @property
    def size(self) -> int:
        """Items, i.e. valid transitions."""
        return int(self.starts.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes + self.starts.nbytes)


def sample_items(data: DeviceDataset, key: jax.Array, count: int) -> Dict[str, jax.Array]:
    """`count` items drawn uniformly (with replacement, as Reverb's Uniform selector) over
    the dataset's valid transitions, as raw replay items {"rows": [count, window, bytes]}."""
    chex.assert_rank([data.rows, data.starts], [2, 1])
    window = data.layout.window
    index = jax.random.randint(key, (count,), 0, data.starts.shape[0])
    first = data.starts[index]
    return {"rows": data.rows[first[:, None] + jnp.arange(window)]}


def sample(data: DeviceDataset, key: jax.Array, batch_size: int) -> Transition:
    """A batch of `Transition`s: `sample_items` decoded as the learner decodes Reverb's."""
    return data.layout.to_transition(sample_items(data, key, batch_size))


def row_bytes(layout: item_layout.ItemLayout) -> int:
    """A row: the frame's bytes, then the packed transition's (agents/replay.py)."""
    return layout.frame_bytes + 4 * len(item_layout.TRANSITION_FIELDS)


def _row_bound(layout: item_layout.ItemLayout, reader, selection: np.ndarray) -> Tuple[int, int]:
    """(an upper bound on the rows, the items) of a selection: each run of selected steps
    inside an episode adds stack - 1 + n rows to its steps (module docstring)."""
    selected = int(selection.sum())
    edges = np.diff(np.concatenate([[0], selection.astype(np.int8), [0]]))
    runs = int(np.sum(edges == 1)) + reader.num_episodes  # episode ends split runs further
    return selected + runs * (layout.frame_stack - 1 + layout.n_step), selected


def estimate_bytes(builder, reader, selection: np.ndarray) -> int:
    """An upper bound on what the selection takes on the device."""
    rows, items = _row_bound(builder.layout, reader, selection)
    return rows * row_bytes(builder.layout) + items * _INDEX_BYTES


def available_bytes() -> Tuple[int, str]:
    """(bytes free for the dataset, where): the device's memory limit where it reports
    one (GPU), else half the host's available memory (on the CPU the arrays are built on
    the host, then copied to the device, which is the host too)."""
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{device.platform} device memory"
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    return available // 2, "half the host's available memory"


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def check_fits(builder) -> None:
    """Raises DatasetError (one line: the figure and the way out) when the regime's
    selection does not fit in memory as device arrays."""
    from eosrl.agents.dataset import DatasetError, DatasetReader
    reader = DatasetReader(builder.config.regime.dataset, verify="none")
    needed = estimate_bytes(builder, reader, builder.selection(reader))
    free, where = available_bytes()
    if needed > free:
        raise DatasetError(
            f"{builder.config.regime.dataset}: the offline regime keeps its selection on the device, "
            f"{_size(needed)} as uint8 rows (frames once), more than the {_size(free)} of {where}; "
            f"select fewer transitions (regime.subset, e.g. 'last {max(1, reader.num_transitions // 2)}') "
            f"or use a machine with more memory")


def load(builder) -> Tuple[DeviceDataset, Dict[str, Any]]:
    """The regime's dataset on the device, and the `dataset_loaded` event's fields."""
    from eosrl.agents.dataset import DatasetReader
    layout = builder.layout
    reader = DatasetReader(builder.config.regime.dataset, verify="none")
    bound, _ = _row_bound(layout, reader, builder.selection(reader))
    writer = RowArrays(row_bytes(layout), capacity=bound)  # allocated once
    adder = item_layout.TransitionAdder.into(writer, builder.config.agent.n_step, builder.config.agent.discount,
                                        layout.frame_stack)
    loaded = builder.load_dataset(adder)
    rows, starts = writer.arrays()
    data = DeviceDataset(jnp.asarray(rows), jnp.asarray(starts), layout)
    return data, {**loaded, "device_bytes": data.nbytes}


def probe_sampler(data: DeviceDataset, seed: int,
                  step: Callable[[], int]) -> Callable[[int], Dict[str, jax.Array]]:
    """`sample_items(n)` for the probes of an offline run: draws from `data` with keys made
    from `seed`, the learner step `step()` and a count of the draws at that step, so the
    probe batches are the same in two runs with one seed, and after a resume."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), 0x0FF1)  # apart from the learner's key
    draws = {"step": -1, "count": 0}
    draw = jax.jit(sample_items, static_argnums=2)

    def sample_n(count: int) -> Dict[str, jax.Array]:
        now = step()
        if now != draws["step"]:
            draws.update(step=now, count=0)
        key = jax.random.fold_in(jax.random.fold_in(base, now), draws["count"])
        draws["count"] += 1
        return draw(data, key, count)

    return sample_n


__all__ = ["DeviceDataset", "RowArrays", "check_fits", "estimate_bytes", "load", "probe_sampler", "sample",
           "sample_items"]
