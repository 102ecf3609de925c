"""The learner's loop, the same in `eosrl train` (one process) and in the learner
role of `eosrl launch`: an update on the next batch, then whatever is due at
that update (a probe, publishing the parameters, a `train` record, an
evaluation, a checkpoint), all counted in learner updates so they fall on the
same updates after a resume.

Where batches come from, who evaluates and what else a `train` record holds
stay with the caller, so the learner cannot tell a dataset from actors. Offline
in one process (`run_on_device`) the updates between two moments the host must
act run as one fused program that draws its batches on the device.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from eosrl.agents import checkpoint, layout
from eosrl.launch.builder import Builder
from eosrl.agents.learner import UpdateMetrics, WindowMetrics
from eosrl.launch import resume
from eosrl.launch.loss_traces import LossTraces
from eosrl.launch.rundir import MetricsWriter, RunDir

if TYPE_CHECKING:  # Reverb: the offline device path (launch/train_seeds.py) runs without it
    from eosrl.launch.channels import SnapshotQueue

Batch = Dict[str, np.ndarray]


def all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree)
               if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating))


class LearnerLoop:
    """One learner with its prober, writing `train` and `probe` records and checkpoints.

    `batches` yields training batches (None: no more data); `sample_items(n)` draws n raw
    replay items (the probe batch); `env_steps()` says how many env steps the run has
    seen. Optional hooks: `snapshot()` takes the replay snapshot paired with each
    checkpoint; `publish(params, net_state, step, env_steps)` hands acting parameters
    to actors; `evaluate(step)` runs an evaluation; `record_values()` adds the caller's
    values to each `train` record and `checkpoint_meta()` to each checkpoint's meta;
    `probe_queue` (a `SnapshotQueue`) takes the probe snapshots to a prober process
    instead of probing here, between updates.
    """

    def __init__(self, builder: Builder, run_dir: RunDir, metrics: MetricsWriter,
                 batches: Iterator[Optional[Batch]], sample_items: Callable[[int], Batch],
                 env_steps: Callable[[], int], *,
                 snapshot: Optional[Callable[[], Optional[str]]] = None,
                 publish: Optional[Callable[..., None]] = None,
                 evaluate: Optional[Callable[[int], Any]] = None,
                 record_values: Callable[[], Dict[str, Any]] = dict,
                 checkpoint_meta: Callable[[], Dict[str, Any]] = dict,
                 probe_queue: Optional[SnapshotQueue] = None):
        self.config = builder.config
        self._builder = builder
        self.learner = builder.make_learner()
        self.prober = None
        if self.config.probe.enabled:
            from eosrl.agents.probes import Prober  # compiles HVPs: only load when asked for
            self.prober = Prober(self.config.probe, self.config.agent, self.learner.loss_fn, self.learner.network,
                                 seed=self.config.run.seed, objective_fn=self.learner.objective_fn)
        self._probe_queue = probe_queue if self.prober is not None else None
        self.run_dir, self.metrics = run_dir, metrics
        self._batches, self._sample_items, self._env_steps = batches, sample_items, env_steps
        self._snapshot, self._publish, self._evaluate = snapshot, publish, evaluate
        self._record_values, self._checkpoint_meta = record_values, checkpoint_meta
        schedule, run = builder.schedule(), self.config.run
        self._log_every = schedule.every(run.log_every)
        self._eval_every = schedule.every(run.eval_every)
        self._checkpoint_every = schedule.every(run.checkpoint_every)
        self.probe_batch: Optional[Batch] = None  # raw items
        self.probe_dataset: Any = None  # offline on the device: the DeviceDataset of `probe.dataset_every`
        self._window: List[UpdateMetrics | WindowMetrics] = []
        # (update, its metrics) not yet checked
        self._pending_loss: Optional[Tuple[int, UpdateMetrics | WindowMetrics]] = None
        self.diverged_at: Optional[int] = None
        # (update, params after it) kept when a probe is due at the next update: its Δθ
        self._previous_params: Optional[Tuple[int, Any]] = None
        self._traces = LossTraces(self.config.probe.loss_trace_window, self.config.agent.target_update_period,
                                  self.config.probe.every)
        self.last_env_steps = 0  # of the last record or checkpoint, should the count become unreadable
        self._tick = (time.time(), self.learner.step)

    def _fixed_probe_batch(self) -> bool:
        """Whether this loop keeps a fixed probe batch (a prober process keeps its own)."""
        return self.prober is not None and self._probe_queue is None and self.config.probe.batch == "fixed"

    def restore(self) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """Loads the newest intact checkpoint of the run (with its probe batch);
        (path, meta), or None when there is none."""
        path = checkpoint.latest(self.run_dir.checkpoints)
        if path is None:
            return None
        self.probe_batch, meta = self._builder.restore(self.learner, path)
        self.last_env_steps = int(meta.get("env_steps", 0))
        self._tick = (time.time(), self.learner.step)
        return path, meta

    # --- fused updates on the device (offline, one process) --------------------------

    def run_on_device(self, data: Any, total: int, progress: Callable[[int], None] = lambda step: None) -> str:
        """Updates until `total` on batches the learner draws from `data` (a device
        dataset, agents/offline.py), fused between the updates where the host must act
        (a probe, a `train` record, an evaluation, a checkpoint), each of which then
        happens as after a single update. A status: `completed` or `diverged` (with the
        `divergence` event at the exact update whose loss was non-finite)."""
        learner = self.learner
        self.start_on_device(data)
        while learner.step < total:
            start = learner.step
            stop = self.next_host_step(start, total)
            window = learner.run(data, stop - start, losses=self.wants_losses(start, stop))
            if not self.after_run(window):
                return "diverged"
            progress(learner.step)
        return "completed"

    def start_on_device(self, data: Any = None) -> None:
        """Before the first fused run: the fixed probe batch, drawn as `update` draws it, and
        the device dataset `data` the probes measure `dataset_sharpness` over (`probe.dataset_every`)."""
        self.probe_dataset = data
        if self._fixed_probe_batch() and self.probe_batch is None:
            self.probe_batch = self._sample_items(self.config.probe.batch_size)
        self._keep_params_before_probe()

    def after_run(self, window: WindowMetrics) -> bool:
        """What is due on the host after a fused run that ended at a host step (its
        `train` window, a probe, records, an evaluation, a checkpoint); False, with the
        `divergence` event written, when its loss went non-finite. `run_on_device` and the
        multi-seed runner (launch/train_seeds.py, each seed's loop) call it after each run."""
        self._window.append(window)
        step = self.learner.step
        if window.losses is not None:  # Learner.run(losses=True): updates step − count + 1 … step
            for i, loss in enumerate(window.losses):
                self._write_traces(self._traces.add(step - window.count + 1 + i, loss))
        if not math.isfinite(window["loss"]):  # a run stops after the update that diverged
            self._pending_loss = (step, window)
            self._loss_was_finite()
            return False
        if self.prober is not None and self.prober.should_probe(step):
            self._probe(step)
        self._records_due(step)
        self._keep_params_before_probe()
        return True

    def _keep_params_before_probe(self) -> None:
        """Keeps the parameters when a probe is due after the next update (a reference:
        the update makes new arrays), for the probe's `last_update` Δθ."""
        step = self.learner.step
        if self.prober is not None and self.prober.should_probe(step + 1):
            self._previous_params = (step, self.learner.state.params)

    def next_host_step(self, step: int, total: int) -> int:
        """The first update after `step` at which something is due on the host."""
        periods = [self._log_every, self._checkpoint_every]
        if self.prober is not None:
            periods.append(self.config.probe.every)
        if self._evaluate is not None and self._eval_every:
            periods.append(self._eval_every)
        stop = min([total] + [(step // p + 1) * p for p in periods if p])
        if self.prober is not None and self.prober.should_probe(stop) and stop - 1 > step:
            stop -= 1  # the update before a probe runs alone: its Δθ is the probe's `last_update`
        return stop

    def wants_losses(self, start: int, stop: int) -> bool:
        """Whether a fused run of updates start+1 … stop must return each update's loss (a
        loss-trace window falls in it); the multi-seed runner asks each seed's loop."""
        return self._traces.wanted(start + 1, stop)

    # --- one step -------------------------------------------------------------------

    def step(self) -> Optional[str]:
        """One update and what is due after it; a status when the learner must stop
        (`diverged`, `no_more_data`), else None."""
        batch = next(self._batches)
        if batch is None:
            return "no_more_data"
        if not self.update(batch):
            return "diverged"
        step = self.learner.step
        if self._publish is not None and step % self.config.distributed.publish_every == 0:
            self._publish(*self.learner.acting_params(), step, self._env_steps())
        self._records_due(step)
        return None

    def _records_due(self, step: int) -> None:
        """What falls on update `step`: a `train` record, an evaluation, a checkpoint."""
        if step % self._log_every == 0:
            self.write_train()
        if self._evaluate is not None and self._eval_every and step % self._eval_every == 0:
            self._evaluate(step)
        if step % self._checkpoint_every == 0:
            self.save()

    def update(self, batch: Batch) -> bool:
        """One update; then a probe when one is due. False once the TD loss has gone
        non-finite: a `divergence` event then names the update where it first did.

        The loss checked is the previous update's, read after this one is dispatched, so
        the check never stalls the device; the caller stops within one update."""
        if self._fixed_probe_batch() and self.probe_batch is None:
            # Drawn once, when learning starts, and kept in checkpoints.
            self.probe_batch = self._sample_items(self.config.probe.batch_size)
        self._keep_params_before_probe()
        metrics = self.learner.update(batch)
        self._window.append(metrics)
        if self._traces.enabled:  # its loss is read when its window is written
            self._write_traces(self._traces.add(self.learner.step, metrics))
        if not self._loss_was_finite():
            return False
        self._pending_loss = (self.learner.step, metrics)  # read at the next update
        step = self.learner.step
        if self.prober is not None and self.prober.should_probe(step):
            if not self._loss_was_finite():  # a probe waits for the update anyway
                return False
            self._probe(step)
        return True

    def _probe(self, step: int) -> None:
        """Probes now, or queues the snapshot for the prober (skipped, with an event, when
        `probe.max_queued` snapshots already wait)."""
        assert self.prober is not None
        env_steps = self._env_steps()
        kept, self._previous_params = self._previous_params, None
        previous = kept[1] if kept is not None and kept[0] == step - 1 else None
        snapshot = self.prober.snapshot(self.learner.state, self.learner.current_lr(), env_steps, previous)
        if self._probe_queue is not None:
            if not self._probe_queue.offer(snapshot):
                self.metrics.write("event", step, env_steps=env_steps, event="probe_skipped",
                                   reason=f"{self._probe_queue.max_queued} snapshots wait for the prober")
            return
        if self.config.probe.batch == "fresh":
            self.probe_batch = self._sample_items(self.config.probe.batch_size)
        from eosrl.agents.probes import draw_sharpness_batches  # loaded with the prober
        full = self.prober.is_full(step)  # between full probes (probe.full_every): λ₁ only
        sharpness_batches = draw_sharpness_batches(self.config.probe.batch_sharpness_batches if full else 0,
                                                   self.config.replay.batch_size, self._sample_items,
                                                   self.learner.preprocess)
        record = self.prober.probe(snapshot, self.learner.preprocess(self.probe_batch), sharpness_batches,
                                   full=full, dataset=self.probe_dataset)
        self.metrics.write("probe", step, env_steps=env_steps,
                           **{k: v for k, v in record.items() if k not in ("kind", "step")})
        self._traces.near_threshold(step, record["sharpness_over_threshold"])

    def _write_traces(self, records: List[Dict[str, Any]]) -> None:
        """`loss_trace` records of completed windows (launch/loss_traces.py)."""
        for record in records:
            step = record.pop("step")
            self.metrics.write("loss_trace", step, env_steps=self._env_steps(), **record)

    def _loss_was_finite(self) -> bool:
        """Checks the pending loss; on the first non-finite one writes the event."""
        if self._pending_loss is None:
            return True
        step, metrics = self._pending_loss
        self._pending_loss = None
        loss = metrics["loss"]
        if math.isfinite(loss):
            return True
        self.diverged_at = step
        self.metrics.write("event", step, env_steps=self._env_steps(), event="divergence",
                           reason="non-finite loss", loss=loss)
        return False

    # --- records and checkpoints ----------------------------------------------------------

    def write_train(self, env_steps: Optional[int] = None) -> None:
        """A `train` record: the run's counts, the caller's values, and the means of the
        updates since the last record."""
        now, step = time.time(), self.learner.step
        rate = (step - self._tick[1]) / max(now - self._tick[0], 1e-9)
        self._tick = (now, step)
        env_steps = self._env_steps() if env_steps is None else env_steps
        values: Dict[str, Any] = {"env_steps": env_steps, "updates_per_second": rate,
                                  **self._record_values()}
        if self._window:
            window, self._window = self._window, []  # read after each update (or run): on the host
            counts, sums, mins, maxs = zip(*(part.summary() for part in window))
            mean = np.sum(np.asarray(sums, np.float64), axis=0) / sum(counts)
            index = {key: i for i, key in enumerate(window[0])}
            for key, i in index.items():
                values[key] = float(mean[i])
            if "lr" in index:  # η_t of a step-size rule: its mean and range over the window
                values["lr_min"] = float(np.min(np.asarray(mins)[:, index["lr"]]))
                values["lr_max"] = float(np.max(np.asarray(maxs)[:, index["lr"]]))
            else:
                values["lr"] = self.learner.current_lr()
        self.last_env_steps = env_steps
        self.metrics.write("train", step, **values)

    def save(self, env_steps: Optional[int] = None) -> Optional[Path]:
        """A checkpoint (with the fixed probe batch and the paired replay snapshot), unless
        the parameters went non-finite: then the last good checkpoint stays the newest."""
        env_steps = self._env_steps() if env_steps is None else env_steps
        if not all_finite(self.learner.state.params):
            self.metrics.write("event", self.learner.step, env_steps=env_steps, event="checkpoint_skipped",
                               reason="non-finite parameters; the last good checkpoint is kept")
            return None
        keep_batch = self._fixed_probe_batch() and self.probe_batch is not None
        meta = {**self._checkpoint_meta(), "env_steps": env_steps, "learner_step": self.learner.step,
                "has_probe_batch": keep_batch, "item_fields": list(layout.ITEM_FIELDS)}
        if self._snapshot is not None:
            meta["replay_checkpoint"] = self._snapshot()
        path = self.learner.save(self.run_dir.checkpoints, keep=self.config.run.keep_checkpoints,
                                 extra={"probe_batch": self.probe_batch} if keep_batch else {}, meta=meta)
        if self._snapshot is not None:
            resume.prune_replay_checkpoints(self.run_dir.path)
        return path

    def finish(self, status: str, env_steps: Optional[int] = None) -> str:
        """Ends the learner's part of the run: the last loss checked, the last `train`
        record, the final checkpoint and a `learner_finished` event. Returns the status
        (`diverged` if the last update's loss was not finite)."""
        if status != "diverged" and not self._loss_was_finite():
            status = "diverged"
        env_steps = self.last_env_steps if env_steps is None else env_steps
        if self._window:
            self.write_train(env_steps)
        for record in self._traces.flush():  # windows the run ended (or diverged) inside
            self.metrics.write("loss_trace", record.pop("step"), env_steps=env_steps, **record)
        self.save(env_steps)
        self.metrics.write("event", self.learner.step, event="learner_finished", status=status,
                           env_steps=env_steps, diverged_at=self.diverged_at)
        return status
