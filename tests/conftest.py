"""Shared test set-up: quiet TensorFlow, configs for quick runs, the axes of drawn figures, random replay items."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIGS = ROOT / "configs"


@pytest.fixture
def figure_axes(monkeypatch):
    """The axes of every figure launch/plot.py draws during the test, in order."""
    import matplotlib.pyplot as plt
    from eosrl.launch import plot
    axes = []
    real_subplots = plt.subplots

    def subplots(*args, **kwargs):
        fig, ax = real_subplots(*args, **kwargs)
        axes.append(ax)
        return fig, ax

    monkeypatch.setattr(plot.plt, "subplots", subplots)
    return axes


def random_items(builder, count, rng):
    """`count` raw replay items of random transitions for `builder`'s env (normal
    observations, discounts in [0.5, 1)): batches for tests that need no real replay."""
    layout = builder.layout
    shape = (count, layout.frame_stack) + tuple(layout.frame_shape)
    return layout.items(rng.normal(size=shape), rng.integers(0, builder.spec.num_actions, count),
                        rng.normal(size=count), rng.uniform(0.5, 1.0, count), rng.normal(size=shape))
