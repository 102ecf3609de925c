"""Checkpoints without pickle: a pytree's leaves in one `.npz`, keyed by tree path.

Restoring needs a template with the same structure (a freshly initialised
learner state); the file only supplies the arrays, so a checkpoint never
executes code when read. Writes go to a temporary file that is renamed into
place, so a crash or a full disk leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np

_NAME = re.compile(r"^ckpt_(\d{10})\.npz$")


class CheckpointError(ValueError):
    pass


def _flatten(tree) -> Dict[str, np.ndarray]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def save(directory: str | Path, step: int, tree: Any, meta: Optional[dict] = None,
         keep: int = 3) -> Path:
    """Writes `tree` (and JSON-serialisable `meta`) as checkpoint number `step`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = _flatten(tree)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta or {}).encode(), dtype=np.uint8)
    path = directory / f"ckpt_{step:010d}.npz"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_ckpt_", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | Path) -> List[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def latest(directory: str | Path) -> Optional[Path]:
    """The newest checkpoint that reads back whole. A newer one that does not (a disk that
    filled, a copy cut short) is passed over with a warning on stderr naming it, so a
    run resumes from the last good state rather than refusing to."""
    for path in reversed(list_checkpoints(directory)):
        problem = verify(path)
        if problem is None:
            return path
        print(f"eosrl: warning: {problem}; falling back to an older checkpoint", file=sys.stderr)
    return None


def verify(path: str | Path) -> Optional[str]:
    """None if every array of the checkpoint reads back (zip CRCs included), else what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as data:
            for key in data.files:
                data[key]
            if "__meta__" in data.files:
                json.loads(bytes(data["__meta__"]).decode() or "{}")
    except Exception as e:  # zipfile/ValueError/OSError/JSON: all mean an unusable file
        return f"{path}: not a readable eosrl checkpoint ({e})"
    return None


def read_meta(path: str | Path) -> dict:
    """The JSON metadata of a checkpoint (counters), without reading its arrays."""
    try:
        with np.load(path, allow_pickle=False) as data:
            raw = data["__meta__"] if "__meta__" in data.files else np.zeros(0, np.uint8)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable eosrl checkpoint ({e})") from None
    return json.loads(bytes(raw).decode() or "{}")


def load(path: str | Path, template: Any) -> Tuple[Any, dict]:
    """Reads a checkpoint into the structure of `template`; returns (tree, meta)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:  # zipfile/ValueError/OSError: all mean an unreadable file
        raise CheckpointError(f"{path}: not a readable eosrl checkpoint ({e})") from None
    meta = json.loads(bytes(arrays.pop("__meta__", np.zeros(0, np.uint8))).decode() or "{}")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    restored = []
    for key_path, leaf in leaves:
        key = jax.tree_util.keystr(key_path)
        if key not in arrays:
            raise CheckpointError(f"{path}: missing array {key} (was it written by another agent or network?)")
        value = arrays[key]
        if value.shape != np.shape(leaf):
            raise CheckpointError(f"{path}: array {key} has shape {value.shape}, expected {np.shape(leaf)}")
        restored.append(value.astype(np.asarray(leaf).dtype))
    return jax.tree_util.tree_unflatten(treedef, restored), meta
