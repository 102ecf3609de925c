"""What the processes of a distributed run read from the Reverb server besides
training batches: a connection once the server answers, the env-step count
(the table's insert count), the learner's parameters (the `params` table) and
its probe snapshots (the `probe_snapshots` queue, read by the prober).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Generator, List, Optional, Tuple

import jax
import numpy as np
import reverb

from eosrl.agents import replay
from eosrl.agents.probes import ProbeSnapshot


def connect(address: str, timeout_s: float = 60.0) -> reverb.Client:
    """A client once the server answers (roles may start before the server is up)."""
    client = reverb.Client(address)
    deadline = time.time() + timeout_s
    while True:
        try:
            client.server_info(timeout=5)
            return client
        except Exception:
            if time.time() > deadline:
                raise ConnectionError(f"--replay {address}: no Reverb server answered within {timeout_s:.0f} s")
            time.sleep(0.5)


def inserted_steps(client: reverb.Client, preloaded: int = 0) -> int:
    """Actor env steps so far: transitions inserted into `replay` (one per actor env
    step) less the `preloaded` ones a dataset put there. A dead server raises within
    seconds: without a deadline Reverb would wait for it for ever."""
    info = client.server_info(timeout=3)[replay.REPLAY_TABLE]
    return max(0, int(info.rate_limiter_info.insert_stats.completed) - preloaded)


def while_server_answers(call: Callable[[], Any]) -> Optional[Any]:
    """`call()`, or None when the replay server cannot be reached (it may be gone at shutdown)."""
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - gRPC errors of a dead server come in several types
        print(f"replay server unreachable ({type(e).__name__}: {e})", flush=True)
        return None


class ParamsChannel:
    """The learner's latest acting parameters with its update and env-step counts, as
    the one item of the `params` table."""

    def __init__(self, client: reverb.Client, template: Any):
        self._client = client
        self._treedef = jax.tree_util.tree_structure(template)

    def publish(self, params, net_state, step: int, env_steps: int) -> None:
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves((params, net_state))]
        self._client.insert(leaves + [np.asarray(step, np.int64), np.asarray(env_steps, np.int64)],
                            priorities={replay.PARAMS_TABLE: 1.0})

    def fetch(self):
        """(params, net_state, learner step, env steps); waits until the learner has published once."""
        _wait_for_items(self._client, replay.PARAMS_TABLE)
        sample = next(self._client.sample(replay.PARAMS_TABLE, num_samples=1, emit_timesteps=False))
        flat = [x[0] for x in sample.data]  # an inserted item is one step: drop that axis
        params, net_state = jax.tree_util.tree_unflatten(self._treedef, flat[:-2])
        return params, net_state, int(flat[-2]), int(flat[-1])


def _wait_for_items(client: reverb.Client, table: str) -> None:
    """Returns once `table` holds an item: polling keeps SIGTERM deliverable, unlike a blocking sample."""
    while replay.table_size(client, table, timeout=3) == 0:
        time.sleep(0.1)


class SnapshotQueue:
    """Probe snapshots from the learner to the prober, oldest first, through the
    `probe_snapshots` table (`probe.mode: process`). An item is encoded by the
    snapshot's field names (`encode_snapshot`): the leaf count of each field of
    `ProbeSnapshot`, then every field's leaves; an item without fields marks the
    learner's end."""

    def __init__(self, client: reverb.Client, template: Any, max_queued: int):
        """`template`: (params, net_state) of the network, as `network.init` returns them."""
        self._client = client
        self._like = ProbeSnapshot.like(*template)
        self.max_queued = max_queued

    def _insert(self, item: List[np.ndarray]) -> None:
        self._client.insert(item, priorities={replay.PROBE_TABLE: 1.0})

    def offer(self, snap: ProbeSnapshot) -> bool:
        """Queues `snap` unless `max_queued` snapshots already wait (then False: the
        learner never waits for the prober)."""
        if self.waiting() >= self.max_queued:
            return False
        self._insert(encode_snapshot(snap))
        return True

    def close(self) -> None:
        """Queues the end marker behind the snapshots still waiting. The table keeps a
        place for it (`replay.probe_table`): were it to wait for the prober to make room,
        a prober that restarts and compiles while the queue is full could outlast the
        wait, and then nothing would tell it to stop."""
        self._insert([np.zeros((0,), np.int64)])

    def oldest(self) -> Tuple[int, Optional[ProbeSnapshot]]:
        """(key, snapshot) of the oldest waiting snapshot (waits for one), which stays
        queued until `done(key)`; the snapshot is None for the learner's end marker,
        which is never done: every prober that reads it ends."""
        _wait_for_items(self._client, replay.PROBE_TABLE)
        sample = next(self._client.sample(replay.PROBE_TABLE, num_samples=1, emit_timesteps=False))
        key = int(sample.info.key)
        flat = [x[0] for x in sample.data]  # an inserted item is one step: drop that axis
        if not flat[0].size:
            return key, None
        return key, decode_snapshot(flat, self._like)

    def done(self, key: int) -> None:
        """Removes a snapshot once its record is written."""
        self._client.mutate_priorities(replay.PROBE_TABLE, deletes=[key])

    def waiting(self) -> int:
        return replay.table_size(self._client, replay.PROBE_TABLE, timeout=3)


def encode_snapshot(snap: ProbeSnapshot) -> List[np.ndarray]:
    """[leaf count of each field of `ProbeSnapshot`, in its order] + the leaves of every
    field (a tree's in `tree_leaves` order, a number as a 0-d array, None as none)."""
    counts, leaves = [], []
    for name in ProbeSnapshot._fields:
        value = getattr(snap, name)
        field = [] if value is None else [np.asarray(x) for x in jax.tree_util.tree_leaves(value)]
        counts.append(len(field))
        leaves += field
    return [np.asarray(counts, np.int64)] + leaves


def decode_snapshot(item: List[np.ndarray], like: ProbeSnapshot) -> ProbeSnapshot:
    """The snapshot `encode_snapshot` made `item` of. Each field takes its shape from
    `like`'s: a tree's structure, a number's type, or (None there) an optional array."""
    counts, leaves = [int(c) for c in item[0]], item[1:]
    if len(counts) != len(ProbeSnapshot._fields):
        raise ValueError(f"a probe snapshot of {len(counts)} fields, not the {len(ProbeSnapshot._fields)} "
                         f"of ProbeSnapshot: learner and prober run different versions of eosrl")
    fields: Dict[str, Any] = {}
    start = 0
    for name, count in zip(ProbeSnapshot._fields, counts):
        field, start = leaves[start:start + count], start + count
        template = getattr(like, name)
        if template is None:
            fields[name] = field[0] if field else None
        elif isinstance(template, (bool, int, float)):
            fields[name] = type(template)(field[0].item())
        else:
            fields[name] = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), field)
    return ProbeSnapshot(**fields)


def rate_limited_batches(address: str, batch_size: int, inserts: Callable[[], int], max_idle_s: float,
                         timeout_ms: int = 1000) -> Generator[Optional[Any], None, None]:
    """Training batches from the rate-limited table; None once no new data has arrived
    for `max_idle_s` (every actor has finished).

    The rate limiter holds sampling back for the stream's short timeout, which keeps
    SIGTERM deliverable (a signal handler runs only once the dataset's C++ call returns:
    at 5 s, a launcher's SIGTERM under load left the learner too little of its 10 s to
    write its final checkpoint); the stream is then reopened."""
    stream = replay.batch_stream(address, batch_size, rate_limiter_timeout_ms=timeout_ms)
    last_inserts, last_change = inserts(), time.time()
    try:
        while True:
            try:
                yield next(stream)
                continue
            except StopIteration:
                pass
            now_inserts = inserts()
            if now_inserts != last_inserts:
                last_inserts, last_change = now_inserts, time.time()
            elif time.time() - last_change > max_idle_s:
                yield None
                return
            stream.close()
            stream = replay.batch_stream(address, batch_size, rate_limiter_timeout_ms=timeout_ms)
    finally:
        stream.close()
