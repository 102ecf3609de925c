"""How replay items are laid out, without Reverb or TensorFlow: `ItemLayout` (writes rows,
reads items back as the learner's `Transition`s) and the n-step `TransitionAdder` that
makes rows and items through any writer. agents/replay.py puts them in Reverb tables;
the offline regime (agents/offline.py) keeps them in device arrays, and that path, the
learner's and the multi-seed runner's import no Reverb and no TensorFlow
(tests/test_seeds.py checks it). The layout itself is described in agents/replay.py's
docstring.
"""
from __future__ import annotations

import collections
from typing import Any, Deque, Dict, List, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from eosrl.agents.types import Transition

ITEM_FIELDS = ("rows",)  # the signature's fields, in its flat order
TRANSITION_FIELDS = ("action", "reward", "discount", "steps")  # the packed float32 entries of a row, in order
_TRANSITION_BYTES = 4 * len(TRANSITION_FIELDS)
_NO_TRANSITION = np.zeros(_TRANSITION_BYTES, np.uint8)


class ItemLayout(NamedTuple):
    """How an env's frames and the n-step transitions sit in an item's rows (module
    docstring): writes rows, and reads items back as `Transition`s."""
    frame_shape: Tuple[int, ...]
    frame_dtype: Any
    frame_stack: int
    n_step: int

    @property
    def frame_bytes(self) -> int:
        return int(np.prod(self.frame_shape, dtype=np.int64)) * np.dtype(self.frame_dtype).itemsize

    @property
    def window(self) -> int:
        return self.frame_stack + self.n_step

    def item_specs(self) -> Dict[str, Tuple[Tuple[int, ...], Any]]:
        """{field: (shape, numpy dtype)} of one item, without TensorFlow."""
        return {"rows": ((self.window, self.frame_bytes + _TRANSITION_BYTES), np.dtype(np.uint8))}

    def signature(self) -> Dict[str, Any]:
        """The Reverb table signature (`tf.TensorSpec`s; loads TensorFlow)."""
        import tensorflow as tf
        return {key: tf.TensorSpec(shape, tf.as_dtype(dtype)) for key, (shape, dtype) in self.item_specs().items()}

    def to_transition(self, items: Dict[str, Any]) -> Transition:
        """A batch of items as the learner's `Transition`s (jittable), observations as the
        env gives them: [B, *frame, stack] (Atari) or [B, *obs] (no stack)."""
        rows = jnp.asarray(items["rows"])
        batch, stack = rows.shape[0], self.frame_stack
        frames = _frames(rows[..., :self.frame_bytes], self.frame_shape, self.frame_dtype, jnp)
        packed = jax.lax.bitcast_convert_type(
            rows[:, -1, self.frame_bytes:].reshape(batch, len(TRANSITION_FIELDS), 4), jnp.float32)
        steps = packed[:, 3].astype(jnp.int32)
        next_frames = jax.vmap(lambda f, m: jax.lax.dynamic_slice_in_dim(f, m, stack))(frames, steps)

        def stacked(frames):
            return frames[:, 0] if stack == 1 else jnp.moveaxis(frames, 1, -1)

        return Transition(obs=stacked(frames[:, :stack]), action=packed[:, 0].astype(jnp.int32),
                          reward=packed[:, 1], discount=packed[:, 2], next_obs=stacked(next_frames))

    def unpacked(self, items: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Items (one or a batch) as `obs` and `next_obs` ([..., stack, *frame]), `action`
        (int32), `reward`, `discount` and `steps` (int32): a readable view for tests and
        inspection."""
        rows = np.asarray(items["rows"])
        frames = _frames(rows[..., :self.frame_bytes], self.frame_shape, self.frame_dtype, np)
        packed = np.ascontiguousarray(rows[..., -1, self.frame_bytes:]).view(np.float32)
        out = {field: packed[..., i].astype(np.int32) if field in ("action", "steps") else packed[..., i]
               for i, field in enumerate(TRANSITION_FIELDS)}
        stack, lead = self.frame_stack, rows.shape[:-2]
        index = (out["steps"][..., None] + np.arange(stack)).reshape(lead + (stack,) + (1,) * len(self.frame_shape))
        out["obs"] = frames.take(np.arange(stack), axis=len(lead))
        out["next_obs"] = np.take_along_axis(frames, index, axis=len(lead))
        return out

    def items(self, obs, action, reward, discount, next_obs, steps=None) -> Dict[str, np.ndarray]:
        """Raw items from a batch of transitions (for tests and users building batches by
        hand): obs and next_obs [B, stack, *frame], the others [B]; `steps` (m, default n)
        places next_obs in the window, and where the two stacks overlap (m < stack) the
        later one is written."""
        obs, next_obs = np.asarray(obs, self.frame_dtype), np.asarray(next_obs, self.frame_dtype)
        batch = obs.shape[0]
        steps = np.full(batch, self.n_step) if steps is None else np.asarray(steps)
        rows = np.zeros((batch, self.window, self.frame_bytes + _TRANSITION_BYTES), np.uint8)
        as_bytes = lambda frames: frames.reshape(frames.shape[:2] + (-1,)).view(np.uint8)  # noqa: E731
        rows[:, :self.frame_stack, :self.frame_bytes] = as_bytes(np.ascontiguousarray(obs))
        next_bytes = as_bytes(np.ascontiguousarray(next_obs))
        for i in range(batch):
            rows[i, steps[i]:steps[i] + self.frame_stack, :self.frame_bytes] = next_bytes[i]
        packed = np.stack([np.asarray(x, np.float32) * np.ones(batch, np.float32)
                           for x in (action, reward, discount, steps)], axis=-1)
        rows[:, -1, self.frame_bytes:] = packed.view(np.uint8)
        return {"rows": rows}


def _frames(data, frame_shape, frame_dtype, xp):
    """[..., W, frame bytes] uint8 -> [..., W, *frame_shape] of the frame dtype (xp: np or jnp)."""
    dtype = np.dtype(frame_dtype)
    lead = data.shape[:-1]
    if dtype == np.bool_:
        values = data != 0
    elif dtype.itemsize == 1:
        values = data.view(dtype) if xp is np else jax.lax.bitcast_convert_type(data, dtype)
    elif xp is np:
        values = np.ascontiguousarray(data).view(dtype)
    else:
        values = jax.lax.bitcast_convert_type(data.reshape(lead + (-1, dtype.itemsize)), dtype)
    return values.reshape(lead + tuple(frame_shape))



class TransitionAdder:
    """Writes n-step transitions of one actor's episodes as rows and items through a
    writer: Reverb's (agents/replay.py, whose `TransitionAdder` builds one) or any object
    with the calls it makes of one (`cells.Append([row]) -> [reference]`,
    `create_item(references)`, `wait(n)`, `close()`), such as the offline regime's
    `RowArrays` (agents/offline.py).

    An `Adder` (agents/types.py): `add_first(obs)` after a reset, `add(action,
    reward, terminated, truncated, next_obs, life_loss)` after each step. A
    termination or a life loss (reported by the env under the Nature preset)
    ends bootstrapping; a termination or a truncation ends the stream. `_env` is
    this adder's column of a writer shared by several envs' adders.
    """

    def __init__(self, writer: Any, n_step: int, discount: float, frame_stack: int, _env: int = 0):
        self._n = n_step
        self._gamma = discount
        self._stack = frame_stack
        self._writer = writer
        self._cells = self._writer.cells
        self._padding: List[None] = [None] * _env  # the columns of the envs before this one
        # Cell references of this episode's newest rows: an item's window.
        self._rows: Deque = collections.deque(maxlen=n_step + frame_stack)
        self._row = -1                    # step index t of the last observation in this episode
        self._actions: List[int] = []
        self._rewards: List[float] = []
        self._continues: List[float] = []  # 0 where bootstrapping stops
        self.items_written = 0

    @staticmethod
    def into(writer: Any, n_step: int, discount: float, frame_stack: int) -> "TransitionAdder":
        """An adder that writes its rows and items through `writer` (class docstring). The
        offline regime's device data (agents/offline.py, `RowArrays`) is made this way, so
        its items are those Reverb stores."""
        return TransitionAdder(writer, n_step, discount, frame_stack)

    def _frame(self, obs: np.ndarray) -> np.ndarray:
        return obs[..., -1] if self._stack > 1 else obs

    def _append(self, frame: np.ndarray, transition: np.ndarray = _NO_TRANSITION) -> None:
        """One row: a frame's bytes, then those of the transition that ends here."""
        row = np.concatenate((np.ascontiguousarray(frame).reshape(-1).view(np.uint8), transition))
        self._rows.append(self._cells.Append(self._padding + [row])[-1])

    def add_first(self, obs: np.ndarray) -> None:
        self._rows.clear()
        for i in range(self._stack - 1):
            self._append(obs[..., i])
        self._append(self._frame(obs))
        self._row = 0
        self._actions, self._rewards, self._continues = [], [], []

    def _transition(self, start: int, end: int) -> np.ndarray:
        """The packed (action, return, bootstrap discount, steps) of the transition from
        step `start` to step `end`, as bytes."""
        ret, scale = 0.0, 1.0
        for t in range(start, end):
            ret += scale * self._rewards[t]
            scale *= self._gamma * self._continues[t]
        return np.array([self._actions[start], ret, scale, end - start], np.float32).view(np.uint8)

    def _create_item(self) -> None:
        """The item whose window ends with the row just appended."""
        self._writer.create_item(list(self._rows))
        self.items_written += 1

    def add(self, action: int, reward: float, terminated: bool, truncated: bool, next_obs: np.ndarray,
            life_loss: bool = False) -> None:
        episode_over = terminated or truncated
        self._actions.append(int(action))
        self._rewards.append(float(reward))
        self._continues.append(0.0 if terminated or life_loss else 1.0)
        self._row += 1
        start = self._row - self._n
        frame = self._frame(next_obs)
        # A terminal inside the window makes later frames irrelevant, but the
        # bootstrap discount is then 0, so the same item layout stays correct.
        if start >= 0:
            self._append(frame, self._transition(start, self._row))
            self._create_item()
        else:
            self._append(frame)
        if episode_over:
            # Transitions that started fewer than n steps before the end bootstrap
            # (or not, after a terminal) from the final observation, `steps` rows on;
            # the final frame is repeated until each one's window is complete.
            newest = self._row  # the step whose row was appended last
            for start in range(max(0, self._row - self._n + 1), self._row):
                while newest < start + self._n - 1:
                    self._append(frame)
                    newest += 1
                self._append(frame, self._transition(start, self._row))
                newest += 1
                self._create_item()
            self._row = -1

    def flush(self) -> None:
        """Waits until the writer has confirmed every item (of every adder sharing it)."""
        self._writer.wait(0)

    def close(self) -> None:
        self._writer.close()


__all__ = ["ITEM_FIELDS", "TRANSITION_FIELDS", "ItemLayout", "TransitionAdder"]
