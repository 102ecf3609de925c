"""Per-update loss traces in windows (`probe.loss_trace_window`: W): the TD loss of every
update around each target-network copy and after each probe near the threshold, where
the edge of stability shows as a non-monotone loss oscillating with period 2, which
`train` means and probes every `probe.every` updates cannot see.

Update u is the one after which the learner's step is u; its loss is the `loss` metric
of that update (at the parameters before it), as in `train` records. Windows:

- `target_copy`: the copy made by update c (c a multiple of `agent.target_update_period`)
  gets updates c − ⌊W/2⌋ + 1 … c + ⌈W/2⌉: the last ⌊W/2⌋ with the old target, then
  ⌈W/2⌉ with the new one;
- `near_threshold`: a probe at update p whose λ₁ ≥ `NEAR_THRESHOLD`·threshold (inline
  probes only: a prober process's records do not reach the learner) gets p + 1 … p + N,
  N = max(W, `probe.every`): the updates until the next probe reads λ₁ again, so the
  trace is continuous for as long as the probes read λ₁ near the threshold.

Each window is one `loss_trace` record when its last update is made (or at the end of
the run, cut short), at `step` = its first update; windows may overlap, and then share
losses. Host bookkeeping only: the losses come from the learner (`Learner.run(losses=True)`
on the fused path, each update's metrics otherwise).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

NEAR_THRESHOLD = 0.9  # λ₁/threshold from which a probe opens a `near_threshold` window


class LossTraces:
    """The open windows of a run and the losses they have gathered."""

    def __init__(self, window: int, target_period: int, near_length: int = 0):
        self.window, self.period = int(window), int(target_period)
        self.near_length = max(self.window, int(near_length))  # N of the module docstring
        self._before = self.window // 2
        self._after = self.window - self._before
        self._near: List[Tuple[int, Dict[str, Any]]] = []  # (first update, extra fields) of near windows
        self._open: Dict[Tuple[str, int], Dict[str, Any]] = {}  # (reason, first update) -> record

    @property
    def enabled(self) -> bool:
        return self.window > 0

    def _copies(self, update: int) -> List[int]:
        """The target copies c whose window holds `update` (c − before < update ≤ c + after)."""
        if not self.period:
            return []
        low = max(update - self._after, 1)
        first = -(-low // self.period) * self.period
        return list(range(first, update + self._before, self.period))

    def _windows(self, update: int) -> List[Tuple[str, int, int, Dict[str, Any]]]:
        """(reason, first update, last update, extra fields) of every window holding `update`."""
        out = [("target_copy", c - self._before + 1, c + self._after, {"target_copy": c})
               for c in self._copies(update)]
        out += [("near_threshold", first, first + self.near_length - 1, extra) for first, extra in self._near
                if first <= update < first + self.near_length]
        return out

    def wanted(self, first: int, last: int) -> bool:
        """Whether any of updates first … last falls in a window (what the fused path asks
        before a run of updates, to return their losses only then)."""
        if not self.enabled or last < first:
            return False
        if any(start <= last and first < start + self.near_length for start, _ in self._near):
            return True
        # A copy c with first − after ≤ c < last + before (multiples of the period ≥ period).
        if not self.period:
            return False
        low = max(first - self._after, 1)
        return -(-low // self.period) * self.period < last + self._before

    def near_threshold(self, step: int, ratio: float) -> None:
        """A probe at `step` measured λ₁/threshold = `ratio`: opens a window after it when near."""
        if self.enabled and math.isfinite(ratio) and ratio >= NEAR_THRESHOLD:
            self._near.append((step + 1, {"probe_step": step, "sharpness_over_threshold": ratio}))

    def add(self, update: int, loss: Any) -> List[Dict[str, Any]]:
        """Update `update`'s loss (a number, or metrics read as `loss["loss"]` only when its
        window is written, so the per-update path never waits for an update in flight):
        the records of the windows it completes."""
        done = []
        for reason, first, last, extra in self._windows(update):
            record = self._open.setdefault((reason, first), {"step": update, "reason": reason, "window": last - first + 1,
                                                             **extra, "losses": []})
            record["losses"].append(loss)
            if update == last:
                done.append(self._close((reason, first)))
        self._near = [(first, extra) for first, extra in self._near if update < first + self.near_length - 1]
        return done

    def flush(self) -> List[Dict[str, Any]]:
        """The windows still open (the run ended or diverged inside them), cut short."""
        return [self._close(key) for key in sorted(self._open, key=lambda key: self._open[key]["step"])]

    def _close(self, key: Tuple[str, int]) -> Dict[str, Any]:
        record = self._open.pop(key)
        record["losses"] = [_loss(x) for x in record["losses"]]
        return record


def _loss(value: Any) -> float:
    return float(value["loss"]) if isinstance(value, Mapping) else float(value)


def read_losses(records: List[Dict[str, Any]]) -> Dict[int, float]:
    """update -> loss over a run's `loss_trace` records (what a reader of them needs)."""
    out: Dict[int, float] = {}
    for r in records:
        if r.get("kind") == "loss_trace":
            for i, loss in enumerate(r.get("losses", [])):
                out[int(r["step"]) + i] = float(loss)
    return out
