"""What the data regimes of an offline run do with a dataset: select a subset of its
transitions (`all`, `first`, `last`, `random`), corrupt a fraction of their actions or
rewards (`Corruption`), and replay the result into an adder (`replay_into`).

Selection and corruption are methods of `DatasetReader` through the `_Subsets` mixin
defined here (`reader.select(...)`, `reader.corrupt(...)`), so this module imports nothing
from reader.py at run time: format <- regimes <- reader, no cycle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .format import MAX_REWARD_VALUES, META_FILE, ROW_FIELDS, DatasetError

if TYPE_CHECKING:
    from pathlib import Path

SELECT_MODES = ("all", "first", "last", "random")
CORRUPT_FIELDS = ("actions", "rewards")
REWARD_CORRUPTIONS = ("observed", "flip")


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


class _Subsets:
    """`DatasetReader`'s subsets and corruption, by global transition index (recording
    order); uses the reader's `num_transitions`, `num_actions`, `meta`, `path`, `_shards`
    and `load_shard`."""

    # What the mixin uses of `DatasetReader`, declared for the type checker only.
    path: Path
    meta: Dict[str, Any]
    num_actions: int
    _shards: List[Dict[str, Any]]

    if TYPE_CHECKING:
        @property
        def num_transitions(self) -> int: ...

        def load_shard(self, index: int, fields: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]: ...

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
