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

    def _fixed_probe_batch(self) -> bool:
        return self.prober is not None and self.config.probe.batch == "fixed"

    def restore(self, directory: Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """Loads the newest checkpoint in `directory` (with its probe batch);
        (path, meta), or None when there is none."""
        path = checkpoint.latest(directory)
        if path is None:
            return None
        self.probe_batch, meta = self._parts.restore(self.learner, path)
        return path, meta

    def update(self, batch) -> None:
        """One update; then a probe when one is due."""
        if self._fixed_probe_batch() and self.probe_batch is None:
            # Drawn once, when learning starts, and kept in checkpoints.
            self.probe_batch = self._sample_items(self.config.probe.batch_size)
        self._window.append(self.learner.update(batch))
        step = self.learner.step
        if self.prober is None or not self.prober.should_probe(step):
            return
        if self.config.probe.batch == "fresh":
            self.probe_batch = self._sample_items(self.config.probe.batch_size)
        record = self.prober.probe(self.learner.preprocess(self.probe_batch))
        self.metrics.write("probe", step, env_steps=self._env_steps(),
                           **{k: v for k, v in record.items() if k not in ("kind", "step")})

    def write_train(self, values: Dict[str, Any]) -> bool:
        """A `train` record of `values` plus the means of the updates since the last
        one; False (after a `divergence` event) when the loss was not finite."""
        values = dict(values)
        if self._window:
            window = jax.device_get(self._window)
            self._window = []
            for key in window[0]:
                values[key] = float(np.mean([m[key] for m in window]))
            values["lr"] = self.learner.current_lr()
        step = self.learner.step
        self.metrics.write("train", step, **values)
        if "loss" in values and not math.isfinite(values["loss"]):
            self.metrics.write("event", step, env_steps=values.get("env_steps"), event="divergence",
                               reason="non-finite loss")
            return False
        return True

    def save(self, directory: Path, meta: Dict[str, Any]) -> Optional[Path]:
        """A checkpoint (with the fixed probe batch), unless the parameters went
        non-finite: then the last good checkpoint stays the newest."""
        if not all_finite(self.learner.state.params):
            self.metrics.write("event", self.learner.step, env_steps=meta.get("env_steps"),
                               event="checkpoint_skipped",
                               reason="non-finite parameters; the last good checkpoint is kept")
            return None
        keep_batch = self._fixed_probe_batch() and self.probe_batch is not None
        return self.learner.save(directory, keep=self.config.run.keep_checkpoints,
                                 extra={"probe_batch": self.probe_batch} if keep_batch else {},
                                 meta={**meta, "learner_step": self.learner.step,
                                       "has_probe_batch": keep_batch})
