"""The prober role (`probe.mode: process`): measures the Hessian of the learner's TD
loss on the snapshots the learner queues, while the learner keeps learning.

Every `probe.every` updates the learner queues a snapshot of exactly what a probe
needs at that update (parameters, target parameters, SN vectors, the scaling of
its next step: agents/probes.ProbeSnapshot) in the `probe_snapshots` queue of the
replay server. This process takes them oldest first and writes each `probe`
record at the learner step the snapshot belongs to, so it never probes a state
the learner did not have.

Falling behind. The queue holds `probe.max_queued` snapshots. The learner never
waits for the prober: when the queue is full it skips that update's snapshot and
writes a `probe_skipped` event, so every missing probe is accounted for in
metrics.jsonl. A snapshot leaves the queue only once its record is written, so
the one a prober was measuring when it died is measured by the prober that
restarts; each record names its snapshot by the Reverb item key, and a
restarted prober deletes, unprobed, a snapshot whose record the dead one had
already written. So every queued snapshot gets exactly one record. When the
learner ends it queues an end marker; the prober works through what was queued
before it, then exits. The marker stays queued: a prober killed after reading it
but before exiting is restarted, and the new one must find it too, or it would
wait for snapshots for ever. Stopped before that (Ctrl-C), it writes how many
snapshots it left unprobed.

The fixed probe batch is drawn from replay when the first snapshot arrives and
kept in RUN_DIR/probe_batch.npz (no pickle), so a restarted prober and a resumed
run probe the same batch; each record names the batch by a digest. With
`probe.batch_sharpness_batches: K` the prober also draws, for every snapshot, K
fresh batches of `replay.batch_size` from the replay table, for the batch sharpness.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import jax
import numpy as np

from eosrl.agents import replay
from eosrl.launch.builder import Builder
from eosrl.launch.config import Config
from eosrl.agents.learner import make_loss_fn, make_objective_fn
from eosrl.agents.probes import Prober, draw_sharpness_batches
from eosrl.launch.channels import SnapshotQueue, connect, while_server_answers
from eosrl.launch.lifeline import stop_on_signals
from eosrl.launch.rundir import MetricsWriter, RunDir, read_metrics

PROBE_BATCH_FILE = "probe_batch.npz"


def batch_digest(batch: Dict[str, np.ndarray]) -> str:
    """A short name of a batch's contents, the same for the same transitions."""
    digest = hashlib.sha1()
    for key in sorted(batch):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(batch[key]).tobytes())
    return digest.hexdigest()[:12]


def load_probe_batch(run_dir: Path) -> Optional[Dict[str, np.ndarray]]:
    path = Path(run_dir) / PROBE_BATCH_FILE
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def save_probe_batch(run_dir: Path, batch: Dict[str, np.ndarray]) -> None:
    """Written whole or not at all: a crash mid-write leaves the old file or none."""
    path = Path(run_dir) / PROBE_BATCH_FILE
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, **batch)
    os.replace(partial, path)


def prober_parts(config: Config) -> Tuple[Builder, Prober, Callable]:
    """(builder, prober, preprocess): the network, the TD loss and the batch layout of
    the run, and no optimiser (the prober measures, it never updates; test_prober checks)."""
    builder = Builder(config)
    loss_fn = make_loss_fn(builder.network, config.agent)
    prober = Prober(config.probe, config.agent, loss_fn, builder.network, seed=config.run.seed,
                    objective_fn=make_objective_fn(loss_fn, builder.network, config.agent))
    return builder, prober, builder.layout.to_transition


def run_prober(config: Config, address: str, run_dir: Path) -> int:
    """Probes queued snapshots until the learner's end marker (or SIGTERM)."""
    builder, prober, preprocess = prober_parts(config)
    client = connect(address)
    queue = SnapshotQueue(client, builder.network.init(jax.random.PRNGKey(0)), config.probe.max_queued)
    rdir = RunDir(run_dir).create()
    metrics = MetricsWriter(rdir)
    batch = load_probe_batch(rdir.path) if config.probe.batch == "fixed" else None
    recorded = {r.get("snapshot_key") for r in read_metrics(rdir.metrics, "probe")}  # by a prober before this one
    probes, last_step, status, ended = 0, 0, "completed", False
    with stop_on_signals() as signals:
        try:
            while True:
                key, snap = queue.oldest()
                if snap is None:  # the learner's end marker, left queued (module docstring)
                    ended = True
                    break
                if str(key) in recorded:
                    queue.done(key)
                    continue
                if batch is None or config.probe.batch == "fresh":
                    # When the first snapshot arrives learning has started, so replay holds data.
                    batch = replay.sample_items(client, config.probe.batch_size, builder.signature())
                    if config.probe.batch == "fixed":
                        save_probe_batch(rdir.path, batch)
                # The batch-sharpness batches (probe.batch_sharpness_batches; none by default) are
                # fresh for every snapshot, of the training batch size, drawn like the probe batch.
                # Between full probes (probe.full_every) a probe measures λ₁ only, without them.
                full = prober.is_full(snap.step)
                sharpness_batches = draw_sharpness_batches(
                    config.probe.batch_sharpness_batches if full else 0, config.replay.batch_size,
                    lambda n: replay.sample_items(client, n, builder.signature()), preprocess)
                record = prober.probe(snap, preprocess(batch), sharpness_batches, full=full)
                metrics.write("probe", snap.step, env_steps=snap.env_steps, batch_digest=batch_digest(batch),
                              snapshot_key=str(key), **{k: v for k, v in record.items() if k not in ("kind", "step")})
                queue.done(key)
                probes, last_step = probes + 1, snap.step
        except BaseException as error:
            status = "interrupted" if signals.stopped(error) else "failed"
            if status == "failed":
                raise
        finally:
            waiting = while_server_answers(queue.waiting)
            if waiting is not None and ended:
                waiting -= 1  # the end marker
            metrics.write("event", last_step, event="prober_finished", status=status, probes=probes,
                          unprobed_snapshots=waiting)
            metrics.close()
    print(f"prober finished after {probes} probes: {status}", flush=True)
    return 0
