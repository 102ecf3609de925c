"""Tests of `eosrl plot` (launch.plot) on synthetic metrics.jsonl files."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from eosrl.launch.plot import plot_runs, read_metrics

FIGURES = {"sharpness.png", "eigenvalues.png", "loss.png", "returns.png"}


def write_run(run_dir: Path, scale: float, with_probes: bool = True, extra_lines=()) -> Path:
    """A plausible run: train every 100 updates, eval every 1000, probes every 100."""
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(100, 3001, 100):
        env_steps = 4 * step + 1000
        train = {"kind": "train", "step": step, "env_steps": env_steps,
                 "loss": scale * math.exp(-step / 1000) + 0.01,
                 "mean_q": step / 300, "grad_norm": 1.0 / (1 + step / 500)}
        if step > 200:  # no finished episode before that
            train["return"] = 10 * math.log1p(step) * scale
        lines.append(train)
        if step % 1000 == 0:
            lines.append({"kind": "eval", "step": step, "env_steps": env_steps,
                          "return_mean": 12 * math.log1p(step) * scale, "return_std": 1.0})
        if with_probes:
            sharpness = min(scale * 2 * (1 + step / 30), 200.0)  # rises, then hovers at 2/η
            eigs = [sharpness * f for f in (1.0, 0.7, 0.5, 0.4, 0.3)]
            lines.append({"kind": "probe", "step": step, "env_steps": env_steps,
                          "eigenvalues": eigs, "residuals": [1e-3] * 5, "sharpness": eigs[0],
                          "threshold": 200.0, "sharpness_over_threshold": eigs[0] / 200.0,
                          "preconditioned": False})
        lines.append({"kind": "actor", "step": step, "env_steps": env_steps, "episodes": step})
    text = "\n".join(json.dumps(line) for line in lines) + "\n" + "".join(extra_lines)
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def test_two_runs_share_each_figure(tmp_path):
    a = write_run(tmp_path / "dqn_sgd", 1.0)
    b = write_run(tmp_path / "c51_sgd", 0.5)
    written = plot_runs([a, b])
    assert {p.name for p in written} == FIGURES
    assert written.skipped == {}
    for path in written:
        assert path.parent == a / "plots"
        assert path.stat().st_size > 5_000, f"{path.name} looks empty"


def test_out_dir_and_missing_kinds_are_reported(tmp_path):
    run = write_run(tmp_path / "no_probes", 1.0, with_probes=False)
    out = tmp_path / "figures"
    written = plot_runs([run], out_dir=out)
    assert {p.name for p in written} == {"loss.png", "returns.png"}
    assert all(p.parent == out for p in written)
    assert set(written.skipped) == {"sharpness.png", "eigenvalues.png"}
    assert "probe" in written.skipped["sharpness.png"]


def test_malformed_lines_are_skipped_with_file_and_line(tmp_path):
    run = write_run(tmp_path / "broken", 1.0,
                    extra_lines=['{"kind": "train", "step": 3100, "loss": 0.1\n',  # truncated
                                 '[1, 2, 3]\n'])
    metrics = run / "metrics.jsonl"
    num_good = len(metrics.read_text().splitlines()) - 2
    with pytest.warns(UserWarning) as caught:
        records = read_metrics(metrics)
    assert len(records) == num_good
    messages = [str(w.message) for w in caught]
    assert any(f"{metrics}:{num_good + 1}:" in m for m in messages)
    assert any(f"{metrics}:{num_good + 2}:" in m for m in messages)
    with pytest.warns(UserWarning):
        assert len(plot_runs([run])) == 4


def test_a_shared_threshold_is_drawn_once(tmp_path, figure_axes):
    from eosrl.launch import plot
    axes = figure_axes
    runs = {"dqn": read_metrics(write_run(tmp_path / "dqn", 1.0) / "metrics.jsonl"),
            "c51": read_metrics(write_run(tmp_path / "c51", 0.5) / "metrics.jsonl")}
    plot.plot_sharpness(runs, tmp_path / "sharpness.png")
    labels = [line.get_label() for line in axes[0].get_lines()]
    assert labels == ["dqn λ₁", "c51 λ₁", "threshold (dqn, c51)"]
