"""The learner's side of a run, shared by `eosrl train` (one process) and the
distributed learner role: updates, Hessian probes and their batch, the window
of update metrics behind each `train` record (where a non-finite loss becomes a
`divergence` event), and checkpoints that keep the fixed probe batch.

Where batches come from and what clocks the run stay with the caller, so the
learner cannot tell a dataset from actors.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from agents import checkpoint
from launch import resume
from launch.rundir import MetricsWriter


def all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree)
               if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating))


class LearningLoop:
    """One learner with its prober, writing `probe` and `train` records to `metrics`.

    `sample_items(n)` draws n raw replay items (the probe batch); `env_steps()`
    says how many env steps the run has seen, for the records.
    """

    def __init__(self, parts, metrics: MetricsWriter, sample_items: Callable[[int], Dict[str, np.ndarray]],
                 env_steps: Callable[[], int]):
        self.config = parts.config
        self._parts = parts
        self.learner = parts.learner()
        self.prober = None
        if self.config.probe.enabled:
            from agents.probes import Prober  # compiles HVPs: only load when asked for
            self.prober = Prober(self.config.probe, self.learner)
        self.metrics = metrics
        self._sample_items = sample_items
        self._env_steps = env_steps
        self.probe_batch: Optional[Dict[str, np.ndarray]] = None  # raw items
        self._window: List[Dict[str, Any]] = []
        self._pending_loss: Optional[Tuple[int, Any]] = None  # (update, device loss) not yet checked
        self.diverged_at: Optional[int] = None
        self.last_env_steps = 0  # of the last record or checkpoint, should the count become unreadable

    def _fixed_probe_batch(self) -> bool:
        return self.prober is not None and self.config.probe.batch == "fixed"

    def restore(self, directory: Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """Loads the newest checkpoint in `directory` (with its probe batch);
        (path, meta), or None when there is none."""
        path = checkpoint.latest(directory)
        if path is None:
            return None
        self.probe_batch, meta = self._parts.restore(self.learner, path)
        self.last_env_steps = int(meta.get("env_steps", 0))
        return path, meta

    def update(self, batch) -> bool:
        """One update; then a probe when one is due. False once the TD loss has gone
        non-finite: a `divergence` event then names the update where it first did.

        The loss checked is the previous update's, read after this one is dispatched, so
        the check never stalls the device; the caller stops within one update."""
        if self._fixed_probe_batch() and self.probe_batch is None:
            # Drawn once, when learning starts, and kept in checkpoints.
            self.probe_batch = self._sample_items(self.config.probe.batch_size)
        metrics = self.learner.update(batch)
        self._window.append(metrics)
        if not self._loss_was_finite():
            return False
        self._pending_loss = (self.learner.step, metrics["loss"])
        step = self.learner.step
        if self.prober is not None and self.prober.should_probe(step):
            if not self._loss_was_finite():  # a probe waits for the update anyway
                return False
            if self.config.probe.batch == "fresh":
                self.probe_batch = self._sample_items(self.config.probe.batch_size)
            record = self.prober.probe(self.learner.preprocess(self.probe_batch))
            self.metrics.write("probe", step, env_steps=self._env_steps(),
                               **{k: v for k, v in record.items() if k not in ("kind", "step")})
        return True

    def _loss_was_finite(self) -> bool:
        """Checks the pending loss; on the first non-finite one writes the event."""
        if self._pending_loss is None:
            return True
        step, loss = self._pending_loss
        self._pending_loss = None
        if math.isfinite(float(loss)):
            return True
        self.diverged_at = step
        self.metrics.write("event", step, env_steps=self._env_steps(), event="divergence",
                           reason="non-finite loss", loss=float(loss))
        return False

    def finish(self) -> bool:
        """Checks the last update's loss (call when the updates stop); False if it diverged."""
        return self.diverged_at is None and self._loss_was_finite()

    def write_train(self, values: Dict[str, Any]) -> None:
        """A `train` record of `values` plus the means of the updates since the last one."""
        values = dict(values)
        if self._window:
            window = jax.device_get(self._window)
            self._window = []
            for key in window[0]:
                values[key] = float(np.mean([m[key] for m in window]))
            values["lr"] = self.learner.current_lr()
        self.last_env_steps = values.get("env_steps", self.last_env_steps)
        self.metrics.write("train", self.learner.step, **values)

    def save(self, directory: Path, meta: Dict[str, Any],
             replay_checkpoint: Optional[Callable[[], Optional[str]]] = None) -> Optional[Path]:
        """A checkpoint (with the fixed probe batch), unless the parameters went
        non-finite: then the last good checkpoint stays the newest.

        `replay_checkpoint()` snapshots the replay table just before, and its path goes
        into the checkpoint's meta: a resumed run continues from the pair, so its env-step
        count, its rate limiter and its learner agree (launch/resume.py)."""
        if not all_finite(self.learner.state.params):
            self.metrics.write("event", self.learner.step, env_steps=meta.get("env_steps"),
                               event="checkpoint_skipped",
                               reason="non-finite parameters; the last good checkpoint is kept")
            return None
        keep_batch = self._fixed_probe_batch() and self.probe_batch is not None
        meta = {**meta, "learner_step": self.learner.step, "has_probe_batch": keep_batch}
        if replay_checkpoint is not None:
            meta["replay_checkpoint"] = replay_checkpoint()
        path = self.learner.save(directory, keep=self.config.run.keep_checkpoints,
                                 extra={"probe_batch": self.probe_batch} if keep_batch else {}, meta=meta)
        if replay_checkpoint is not None:
            resume.prune_replay_checkpoints(directory.parent)
        return path
