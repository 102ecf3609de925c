"""Loading a dataset into replay: `replay_into` pushes its (selected, possibly
corrupted) transitions through an `Adder` (agents/types.py), which is how the
offline regimes fill the replay table (launch/builder.py, `Builder.load_dataset`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from eosrl.agents.types import Adder

from .format import DatasetError
from .reader import DatasetReader
from .regimes import CORRUPT_FIELDS, Corruption


def _runs(mask: np.ndarray) -> List[Tuple[int, int]]:
    """[start, end) of each maximal run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def replay_into(reader: DatasetReader, adder: Adder, selection: Optional[np.ndarray] = None,
                corruption: Optional[Corruption] = None, clip_rewards: bool = False,
                life_loss_terminal: bool = False) -> Dict[str, int]:
    """Pushes the selected transitions, in recording order, into an `Adder`
    (agents/types.py).

    Each maximal run of selected transitions inside an episode becomes one adder episode:
    it opens with `add_first` at the run's first observation (its stack holds the real
    earlier frames) and its last step ends the episode. A run that stops before the
    episode's end is handed over as truncated, so it bootstraps from its last observation
    like a time limit; n-step returns never reach past a gap in the selection. Recorded
    life losses are passed on with `life_loss_terminal`. Corrupted values replace the
    recorded ones before the optional clipping to [-1, 1], as the actor clips.
    Returns counts of transitions, adder episodes (runs) and dataset episodes touched.
    """
    mask = None if selection is None else np.zeros(reader.num_transitions, bool)
    if mask is not None:
        mask[reader._indices(selection)] = True
    if corruption is not None and corruption.field not in CORRUPT_FIELDS:
        raise DatasetError(f"replay_into: corruption of unknown field {corruption.field!r}")
    counts = {"transitions": 0, "runs": 0, "episodes": 0}
    for episode in reader.iter_episodes():
        first, length = episode.first_transition, episode.length
        chosen = np.ones(length, bool) if mask is None else mask[first:first + length]
        runs = _runs(chosen)
        if not runs:
            continue
        actions, rewards = episode.actions.copy(), episode.rewards.copy()
        if corruption is not None:
            positions, values = corruption.slice(first, length)
            (actions if corruption.field == "actions" else rewards)[positions] = values
        if clip_rewards:
            rewards = np.clip(rewards, -1.0, 1.0)
        life_losses = episode.life_losses if life_loss_terminal else np.zeros(length, bool)
        for start, end in runs:
            adder.add_first(episode.observation(start))
            for t in range(start, end):
                terminated = bool(episode.terminals[t])
                adder.add(int(actions[t]), float(rewards[t]), terminated, t == end - 1 and not terminated,
                          episode.observation(t + 1), bool(life_losses[t]))
        counts["transitions"] += int(chosen.sum())
        counts["runs"] += len(runs)
        counts["episodes"] += 1
    return counts
