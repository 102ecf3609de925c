"""Several seeds (and step sizes) of one offline config as one program (PureJaxRL's
`vmap(make_train(config))(rngs)`).

The learners of one config that differ only in `run.seed` share their update function:
it closes over the network, the agent config, the optimiser and the sampler, none of
which depends on the seed (agents/learner.py: the seed only initialises the state and
its PRNG key). `SeedBatch` stacks their states on a leading axis, each initialised by
its own `Learner` exactly as a lone run's, and runs the fused update segment
(`accumulate`, as `Learner.run` does) under `jax.vmap`: one program per segment for S
seeds, each drawing its batches with its own key from the dataset on the device (one
array for all seeds, or one per seed where the seed picks the subset or corruption).
After the segment each learner `adopt`s its slice, so everything on the host (records,
probes, checkpoints: launch/train_seeds.py) happens per seed as in a lone run.

Learners may also differ in their step size, `agent.optimizer.lr`, which a lone run's
update closes over as a constant. Then each one's lr is an argument of the vmapped step
(`step_sizes`, in_axes 0), and the step builds its optimiser from it inside the traced
function (`Learner.accumulated_step_at`): the same optax transformation, so the same
optimiser state as a lone run's (its checkpoints, and the probes that read the momentum
buffer, see no difference), which optax.inject_hyperparams, keeping the rate in the
state, would change. On the CPU the traced rate gives the constant's floats bit for bit
(tests/test_seeds.py) but for a linear schedule, where optax subtracts lr_end from it in
float32 rather than from the constant in float64 (a last-bit difference in the rate), so
learners that share one lr keep the lone run's step, closing over it. A step-size rule
(`agent.optimizer.step_size_rule`) computes η_t from lr within the update, so there the
lrs must agree (`step_sizes` refuses).

On the CPU the segment is K dispatches of the vmapped step (as `Learner.run` there,
`fuse` says why); elsewhere one vmapped `lax.scan`. No Reverb and no TensorFlow are
imported on this path (tests/test_seeds.py).
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from eosrl.agents.learner import Learner, WindowMetrics, empty_summary, fuse, fuse_traced
from eosrl.agents.offline import DeviceDataset


def stack(trees: Sequence[Any]) -> Any:
    """Pytrees of one structure stacked on a new leading axis."""
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(tree: Any, count: int) -> List[Any]:
    """`stack`'s inverse: the `count` slices of a stacked pytree."""
    return [jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], tree) for i in range(count)]


def stack_datasets(datasets: Sequence[DeviceDataset]) -> DeviceDataset:
    """Per-seed datasets of one layout and item count as one with a leading seed axis.
    Their row counts may differ (a random subset's runs of steps, each padded, vary with
    the seed): shorter ones get zero rows at the end, which no item's window reaches."""
    layout = datasets[0].layout
    if any(d.layout != layout or d.size != datasets[0].size for d in datasets):
        raise ValueError("the seeds' datasets differ in layout or item count: run the seeds one by one")
    rows = max(int(d.rows.shape[0]) for d in datasets)
    padded = [jnp.pad(d.rows, ((0, rows - int(d.rows.shape[0])), (0, 0))) for d in datasets]
    return DeviceDataset(jnp.stack(padded), jnp.stack([d.starts for d in datasets]), layout)


def step_sizes(learners: Sequence[Learner]) -> Optional[jax.Array]:
    """The learners' `agent.optimizer.lr`s ([S] float32), the argument their vmapped step
    takes, or None where they share one (the step then closes over it as a lone run's
    does). Refuses different lrs under a step-size rule, which computes each update's
    step size from lr in the update it closes over (agents/step_sizes.py)."""
    optimizers = [learner.agent.optimizer for learner in learners]
    lrs = [optimizer.lr for optimizer in optimizers]
    if len(set(lrs)) == 1:
        return None
    if optimizers[0].step_size_rule != "constant":
        raise ValueError(f"agent.optimizer.lr: {', '.join(map(str, lrs))} under agent.optimizer.step_size_rule "
                         f"{optimizers[0].step_size_rule}, which sets each step size from lr: run one lr at a time")
    return jnp.asarray(lrs, jnp.float32)


class SeedBatch:
    """The learners of one config with different seeds (and step sizes), run together as one
    vmapped program.

    `data` is one `DeviceDataset` all seeds draw from, or one per learner (stacked here).
    `run(count, members)` makes `count` updates on the learners `members` (indices; all
    by default) and returns each one's `WindowMetrics`, as its own `Learner.run` would."""

    def __init__(self, learners: Sequence[Learner], data: DeviceDataset | Sequence[DeviceDataset]):
        self.learners = list(learners)
        self._shared = isinstance(data, DeviceDataset)
        # Each learner's dataset (one object for all when shared).
        self._data: List[DeviceDataset] = [data] * len(self.learners) if isinstance(data, DeviceDataset) else list(data)
        if len(self._data) != len(self.learners):
            raise ValueError(f"{len(self._data)} datasets for {len(self.learners)} learners")
        self._lrs = step_sizes(self.learners)
        for learner, own in zip(self.learners, self._data):  # traces each learner's update once: its metric names
            learner.metric_size(own)
        lead = self.learners[0]

        def step(state, summary, data, lr):  # one learner's: the same function for all (module docstring)
            own = lead.accumulated_step if lr is None else lead.accumulated_step_at(lr)
            return own(state, summary, data)

        axes = (0, 0, None if self._shared else 0, None if self._lrs is None else 0)
        self._step = jax.jit(jax.vmap(step, in_axes=axes))
        self._scan = self._vmapped(fuse, step, axes)
        self._scan_traced = self._vmapped(fuse_traced, step, axes)  # compiled when a loss trace needs it
        self.scan = jax.default_backend() != "cpu"  # as Learner.run: `fuse` says why
        self._stacked: Dict[Tuple[int, ...], DeviceDataset] = {}

    @staticmethod
    def _vmapped(fuser, step, axes):
        """`fuser(step)(state, summary, data, length)` (`fuse` or `fuse_traced`), each learner's
        step at its own lr, vmapped over the learners and jitted per `length`."""
        def fused(state, summary, data, lrs, length):
            def one(s, m, d, lr):
                return fuser(functools.partial(step, lr=lr))(s, m, d, length)
            return jax.vmap(one, in_axes=axes)(state, summary, data, lrs)
        return jax.jit(fused, static_argnums=4)

    def _members_data(self, members: Tuple[int, ...]) -> DeviceDataset:
        if self._shared:
            return self._data[0]
        if members not in self._stacked:  # one copy per set of members (seeds drop out when they diverge)
            self._stacked = {members: stack_datasets([self._data[i] for i in members])}
        return self._stacked[members]

    def run(self, count: int, members: Optional[Sequence[int]] = None,
            losses: bool | Sequence[bool] = False) -> List[WindowMetrics]:
        """`count` updates of each learner in `members`, vmapped; waits for them. A learner
        whose loss goes non-finite stops at that update (its window's `count` says where),
        as in `Learner.run`, while the others go on. `losses` (one for all, or one per
        member): the windows that also hold each update's loss, as `Learner.run(losses=True)`."""
        members = tuple(range(len(self.learners)) if members is None else members)
        want = [losses] * len(members) if isinstance(losses, bool) else [bool(w) for w in losses]
        traced: Any = []
        learners = [self.learners[i] for i in members]
        data = self._members_data(members)
        size = learners[0].metric_size(self._data[members[0]])
        state = stack([learner.state for learner in learners])
        summary = stack([empty_summary(size)] * len(learners))
        lrs = None if self._lrs is None else self._lrs[np.asarray(members)]
        if self.scan and any(want):
            state, summary, traced = self._scan_traced(state, summary, data, lrs, int(count))  # [S, K, M]
        elif self.scan:
            state, summary = self._scan(state, summary, data, lrs, int(count))
        else:
            for _ in range(int(count)):  # dispatched without waiting; read once below
                state, summary = self._step(state, summary, data, lrs)
                if any(want):
                    traced.append(summary.last)  # [S, M]
        host = jax.device_get(summary._asdict())  # one copy for all the seeds
        windows = [learner.adopt(slice_, {key: np.asarray(value[i]) for key, value in host.items()})
                   for i, (learner, slice_) in enumerate(zip(learners, unstack(state, len(learners))))]
        if any(want):
            traced = np.asarray(jax.device_get(traced))
            if not self.scan:
                traced = np.swapaxes(traced.reshape(-1, len(learners), size), 0, 1)
            for i, window in enumerate(windows):
                if want[i]:
                    window.losses = traced[i][:window.count, list(window).index("loss")]
        return windows


__all__ = ["SeedBatch", "stack", "stack_datasets", "step_sizes", "unstack"]
