"""The run directory contract (see the design notes) and the metrics writer.

runs/<name>/
  config.yaml     resolved config, exactly what ran
  metrics.jsonl   one JSON object per line, each with "kind" and "step"
  checkpoints/    learner state (npz, no pickle)
  replay/         Reverb table checkpoints (when enabled)
  tb/             TensorBoard events
  plots/          PNGs made by `eosrl plot`

Each metrics line is flushed to the OS as it is written, so a crashed process, a
NaN or Ctrl-C never loses the records written before it, and fsynced, so neither
does a machine that goes down; `actor` records (one per episode: a MinAtar episode
is ~11 steps, so over a thousand a second, and an fsync costs ~160 µs) are fsynced
at most once a second.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

import numpy as np

KINDS = ("train", "eval", "probe", "actor", "event", "loss_trace")
ACTOR_FSYNC_SECONDS = 1.0


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def replay(self) -> Path:
        return self.path / "replay"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def is_run(self) -> bool:
        """Whether the folder is recognisably an eosrl run (what `--overwrite` may delete)."""
        return self.config.is_file() and self.metrics.is_file()

    def create(self) -> "RunDir":
        for p in (self.path, self.checkpoints, self.tb):
            p.mkdir(parents=True, exist_ok=True)
        return self


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "__array__"):
        array = np.asarray(value)
        return _jsonable(array.tolist()) if array.ndim else _jsonable(array.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan"/"inf": JSON has no literal for them
    return value


class MetricsWriter:
    """Appends records to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: RunDir, tensorboard: bool = True):
        self._file = open(run_dir.metrics, "a", buffering=1)
        self._synced = time.monotonic()
        self._tb = None
        if tensorboard:
            import tensorflow as tf  # TF is already loaded by Reverb; import lazily for tools.
            self._tb = tf.summary.create_file_writer(str(run_dir.tb))

    def write(self, kind: str, step: int, **values: Any) -> Dict[str, Any]:
        assert kind in KINDS, kind
        record = {"kind": kind, "step": int(step), "time": time.time(), **_jsonable(values)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if kind != "actor" or time.monotonic() - self._synced >= ACTOR_FSYNC_SECONDS:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()
        if self._tb is not None:
            self._to_tensorboard(kind, int(step), record)
        return record

    def _to_tensorboard(self, kind: str, step: int, record: Dict[str, Any]) -> None:
        import tensorflow as tf
        assert self._tb is not None
        with self._tb.as_default(step=step):
            if kind == "loss_trace":  # each update's loss at its own update
                for i, loss in enumerate(record["losses"]):
                    if isinstance(loss, float):
                        tf.summary.scalar("loss_trace/loss", loss, step=step + i)
                return
            for key, value in record.items():
                if key in ("kind", "step", "time"):
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    tf.summary.scalar(f"{kind}/{key}", value)
                elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                    for i, v in enumerate(value):
                        tf.summary.scalar(f"{kind}/{key}_{i}", v)
                elif isinstance(value, dict):  # e.g. a probe's layer_sharpness, {layer: λ₁}
                    for name, v in value.items():
                        if isinstance(v, (int, float)) and not isinstance(v, bool):
                            tf.summary.scalar(f"{kind}/{key}/{name}", v)

    def close(self) -> None:
        if self._file.closed:
            return
        if self._tb is not None:
            self._tb.flush()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def read_metrics(path: str | Path, kind: Optional[str] = None) -> Iterator[Dict[str, Any]]:
    """Records of metrics.jsonl (optionally of one kind). A malformed line (a run
    killed mid-write leaves a torn last line) is skipped with a warning naming it."""
    import warnings
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                warnings.warn(f"{path}:{lineno}: skipped malformed line ({e.msg})")
                continue
            if not isinstance(record, dict) or "kind" not in record or "step" not in record:
                warnings.warn(f"{path}:{lineno}: skipped line without 'kind' and 'step'")
                continue
            if kind is None or record.get("kind") == kind:
                yield record


# Records of the learner's updates that a resume from an earlier checkpoint makes again.
SUPERSEDED_KINDS = ("train", "probe", "eval", "loss_trace")


def without_superseded(records: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """A run's records as its history reads: each `resumed` event at learner update S drops
    the `train`, `probe`, `eval` and `loss_trace` records written before it at updates after S. A crashed
    run leaves those for updates after its last checkpoint; the resumed run makes the
    updates again from that checkpoint and writes its own. The file keeps both (nothing
    written is ever lost); plots and study tables read this view."""
    kept: List[Dict[str, Any]] = []
    for record in records:
        if record.get("kind") == "event" and record.get("event") == "resumed":
            kept = [r for r in kept if r.get("kind") not in SUPERSEDED_KINDS or r["step"] <= record["step"]]
        kept.append(record)
    return kept


def number(value: Any) -> Optional[float]:
    """A float from a metrics field; None for missing or non-numeric values (the
    writer stores non-finite floats as the strings "nan"/"inf", which come back as floats)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def route_native_logs(log_path: str | Path) -> None:
    """Sends what C++ libraries (TensorFlow, Reverb, XLA) print on file descriptor 2
    to `log_path`, while Python's own stderr (errors, progress bar) stays on the
    terminal. Reverb has no switch for its informational lines; this keeps them
    out of the user's way without losing them."""
    import sys
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    terminal = os.dup(2)
    log_fd = os.open(str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stderr = os.fdopen(terminal, "w", buffering=1)
