"""Where a resumed run starts: the learner checkpoint and the replay snapshot paired with it.

Whenever the learner writes a checkpoint it first asks the replay server for a
table checkpoint and records that snapshot's path in its meta (see
`LearnerLoop.save`). On resume the replay server loads exactly that snapshot,
so three things that must agree do: the learner's update count, the table's
rate-limiter counts (samples drawn, items inserted), and the env-step count,
which is the table's insert count. Snapshots that belong to no kept learner
checkpoint are removed: a newer one would put back data, and rate-limiter
credit, that the restored learner never saw.

Without a paired snapshot (replay checkpoints off, or the snapshot lost), the
table starts empty and the env-step count continues from the learner's meta.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from eosrl.agents import checkpoint
from eosrl.launch.rundir import RunDir


def snapshots_replay(config) -> bool:
    """Whether learner checkpoints come with a replay snapshot: offline, the table is
    the dataset, which is reloaded instead of copied."""
    return config.replay.checkpoint and config.regime.mode != "offline"


# The item fields of checkpoints written before `item_fields` was recorded in their meta,
# when actions, returns and discounts were cells of their own (agents/replay.py).
UNPACKED_ITEM_FIELDS = ("action", "discount", "next_obs", "obs", "reward")


def item_layout_problem(meta: dict) -> Optional[str]:
    """Why this version cannot resume from a checkpoint with `meta`: its replay snapshot
    or fixed probe batch holds items of another layout. None when it can (the learner
    state does not depend on the layout, so a checkpoint with neither resumes)."""
    from eosrl.agents.layout import ITEM_FIELDS
    fields = tuple(meta.get("item_fields", UNPACKED_ITEM_FIELDS))
    held = [what for what, present in (("replay snapshot", _paired(meta) is not None),
                                        ("probe batch", meta.get("has_probe_batch"))) if present]
    if fields == ITEM_FIELDS or not held:
        return None
    return (f"its {' and '.join(held)} hold replay items with fields {', '.join(fields)}; this eosrl "
            f"reads {', '.join(ITEM_FIELDS)}: start a new run with this version")


def _paired(meta: dict) -> Optional[Path]:
    path = meta.get("replay_checkpoint")
    return Path(path) if path and (Path(path) / "DONE").exists() else None


def _snapshots(run_dir: RunDir):
    """Reverb's table checkpoints: one timestamped folder each, complete once it holds DONE."""
    return sorted(p for p in run_dir.replay.iterdir() if p.is_dir()) if run_dir.replay.is_dir() else []


def paired_snapshot(run_path: str | Path) -> Optional[Path]:
    """The snapshot paired with the newest intact learner checkpoint, if it is on disk."""
    run_dir = RunDir(run_path)
    latest = checkpoint.latest(run_dir.checkpoints)
    return _paired(checkpoint.read_meta(latest)) if latest is not None else None


def prepare_replay(run_path: str | Path) -> Optional[Path]:
    """Before a replay server starts on RUN_DIR/replay: removes every snapshot but the
    paired one, which Reverb then loads as the newest. Returns it (None: start empty)."""
    run_dir = RunDir(run_path)
    keep = paired_snapshot(run_path)
    for snapshot in _snapshots(run_dir):
        if keep is None or snapshot.resolve() != keep.resolve():
            shutil.rmtree(snapshot, ignore_errors=True)
    return keep


def prune_replay_checkpoints(run_path: str | Path) -> None:
    """Removes the snapshots that no kept learner checkpoint names."""
    run_dir = RunDir(run_path)
    named = set()
    for path in checkpoint.list_checkpoints(run_dir.checkpoints):
        try:
            snapshot = checkpoint.read_meta(path).get("replay_checkpoint")
        except checkpoint.CheckpointError:
            continue
        if snapshot:
            named.add(Path(snapshot).resolve())
    for snapshot in _snapshots(run_dir):
        if snapshot.resolve() not in named:
            shutil.rmtree(snapshot, ignore_errors=True)


def env_step_offset(run_path: Optional[str | Path]) -> int:
    """What to add to the table's count of actor inserts to get the run's env steps:
    0 when the table continues the run (fresh, or its paired snapshot is restored),
    the checkpoint's env steps when it starts empty on resume."""
    if run_path is None:
        return 0
    run_dir = RunDir(run_path)
    latest = checkpoint.latest(run_dir.checkpoints)
    if latest is None:
        return 0
    meta = checkpoint.read_meta(latest)
    return 0 if _paired(meta) is not None else int(meta.get("env_steps", 0))
