"""Unit tests of learner checkpoints (agents/checkpoint.py and Learner.save/restore).

The round trip restores a *trained* learner into one built with another seed, so
every leaf that restore must bring back (online and target parameters, the SN
vectors of both networks, the optimiser state, the step and the PRNG key)
differs between the two before the restore and must match bitwise after it.
"""
import numpy as np
import jax
import pytest

from eosrl.agents import checkpoint, networks
from eosrl.agents.config import AgentConfig, OptimizerConfig, SpectralNormConfig
from eosrl.agents.learner import Learner
from eosrl.agents.types import Transition

OBS_DIM, NUM_ACTIONS, BATCH = 3, 2, 8
TRAIN_UPDATES, MORE_UPDATES = 3, 3
# Period 2 with 3 updates: the target was copied once (at update 2), so it differs from
# both the initial parameters (which a fresh learner has) and the online ones.
AGENT = AgentConfig(kind="dqn", network="mlp", hidden_sizes=[8], discount=0.9,
                    optimizer=OptimizerConfig(name="adam", lr=1e-2),
                    spectral_norm=SpectralNormConfig(layers="-2", mode="divide"),
                    target_update_period=2)


def _batches(n, seed):
    rng = np.random.default_rng(seed)
    return [Transition(obs=rng.normal(size=(BATCH, OBS_DIM)).astype(np.float32),
                       action=rng.integers(NUM_ACTIONS, size=BATCH).astype(np.int32),
                       reward=rng.normal(size=BATCH).astype(np.float32),
                       discount=(0.9 * (rng.random(BATCH) > 0.2)).astype(np.float32),
                       next_obs=rng.normal(size=(BATCH, OBS_DIM)).astype(np.float32))
            for _ in range(n)]


def _leaves(tree):
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def assert_trees_bitwise_equal(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    got, want = _leaves(got), _leaves(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _differs(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(_leaves(a).values(), _leaves(b).values()))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Learner A (seed 0) trained and saved; learner B (seed 1) restored from A's file."""
    network = networks.make_network(AGENT, "gym", (OBS_DIM,), NUM_ACTIONS)
    a = Learner(network, AGENT, seed=0)
    initial = a.state
    for batch in _batches(TRAIN_UPDATES, seed=1):
        a.update(batch)
    directory = tmp_path_factory.mktemp("ckpt")
    path = a.save(directory, meta={"env_steps": 123}, keep=3)
    b = Learner(network, AGENT, seed=1)
    fresh_b = b.state
    extra, meta = b.restore(path)
    return {"a": a, "b": b, "saved": a.state, "initial": initial, "fresh_b": fresh_b,
            "restored": b.state, "meta": meta, "extra": extra, "path": path}


def test_restore_brings_back_every_leaf_bitwise(pair):
    """Breaks if Learner.restore keeps any part of its own state (target params, SN vectors
    of either network, optimiser state, step or rng) instead of the checkpoint's."""
    saved, fresh_b, initial = pair["saved"], pair["fresh_b"], pair["initial"]
    # The case is only informative if every field of the fresh learner B differs from A's.
    for field in saved._fields:
        assert _differs(getattr(saved, field), getattr(fresh_b, field)), field
    assert _differs(saved.target_params, saved.params)
    assert _differs(saved.target_params, initial.target_params)
    assert _differs(saved.target_net_state, initial.target_net_state)
    assert _differs(saved.target_net_state, saved.net_state)
    assert_trees_bitwise_equal(pair["restored"], saved)
    assert int(pair["restored"].step) == TRAIN_UPDATES
    assert pair["meta"] == {"env_steps": 123} and pair["extra"] == {}


def test_restored_learner_continues_bitwise_like_the_original(pair):
    """Breaks if restore drops state that later updates depend on (optimiser moments, step
    counting towards the target period, SN vectors) or restores it with another dtype."""
    a, b = pair["a"], pair["b"]
    assert_trees_bitwise_equal(b.state, a.state)
    for batch in _batches(MORE_UPDATES, seed=2):
        a.update(batch)
        b.update(batch)
        assert_trees_bitwise_equal(b.state, a.state)
    assert a.step == b.step == TRAIN_UPDATES + MORE_UPDATES


# ----------------------------------------------------------------------------
# The branches of agents/checkpoint.py on small trees.

TREE = {"w": np.arange(2000, dtype=np.float32).reshape(40, 50), "n": np.int32(7)}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_load_of_a_truncated_file_raises_checkpoint_error_naming_it(tmp_path):
    """Breaks if load lets the zip error escape, or its message does not name the file."""
    path = checkpoint.save(tmp_path, 1, TREE)
    _truncate(path)
    with pytest.raises(checkpoint.CheckpointError, match="ckpt_0000000001.npz"):
        checkpoint.load(path, TREE)
    with pytest.raises(checkpoint.CheckpointError, match="ckpt_0000000001.npz"):
        checkpoint.read_meta(path)


def test_load_with_a_template_leaf_missing_from_the_file_names_it(tmp_path):
    """Breaks if load fills a leaf the file lacks from the template instead of refusing."""
    path = checkpoint.save(tmp_path, 1, TREE)
    template = {**TREE, "extra": np.zeros(3, np.float32)}
    with pytest.raises(checkpoint.CheckpointError, match=r"missing array \['extra'\]"):
        checkpoint.load(path, template)


def test_load_with_a_shape_mismatch_names_the_array_and_shapes(tmp_path):
    """Breaks if load drops the shape check (a wrong-shaped array would be restored silently)."""
    path = checkpoint.save(tmp_path, 1, TREE)
    template = {**TREE, "w": np.zeros((50, 40), np.float32)}
    with pytest.raises(checkpoint.CheckpointError, match=r"\['w'\] has shape \(40, 50\), expected \(50, 40\)"):
        checkpoint.load(path, template)


def test_load_returns_the_tree_with_template_dtypes_and_the_meta(tmp_path):
    """Breaks if load returns the file's arrays in another dtype or loses the metadata."""
    path = checkpoint.save(tmp_path, 5, TREE, meta={"env_steps": 9})
    tree, meta = checkpoint.load(path, TREE)
    assert_trees_bitwise_equal(tree, TREE)
    assert meta == {"env_steps": 9} and checkpoint.read_meta(path) == {"env_steps": 9}


def test_save_keeps_only_the_newest_checkpoints(tmp_path):
    """Breaks if pruning keeps the oldest files, keeps too many, or is skipped."""
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, TREE, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "ckpt_0000000003.npz", "ckpt_0000000004.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000000003.npz", "ckpt_0000000004.npz"]


def test_failed_write_leaves_no_temporary_file_and_the_previous_checkpoint(tmp_path, monkeypatch):
    """Breaks if save writes in place or leaves its temporary file behind after an error."""
    first = checkpoint.save(tmp_path, 1, TREE)

    def broken_savez(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path, 2, TREE)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
    assert checkpoint.verify(first) is None


def test_latest_skips_an_unreadable_newest_checkpoint_with_a_warning(tmp_path, capsys):
    """Breaks if latest returns the newest file without checking that it reads back."""
    older = checkpoint.save(tmp_path, 1, TREE)
    newest = checkpoint.save(tmp_path, 2, TREE)
    assert checkpoint.latest(tmp_path) == newest
    _truncate(newest)
    assert checkpoint.latest(tmp_path) == older
    assert newest.name in capsys.readouterr().err
    _truncate(older)
    assert checkpoint.latest(tmp_path) is None
    assert checkpoint.latest(tmp_path / "absent") is None


def test_verify_reads_every_array_and_the_meta(tmp_path):
    """Breaks if verify only opens the zip (a corrupted array body, CRC error, would pass)
    or skips the metadata."""
    good = checkpoint.save(tmp_path / "good", 1, TREE, meta={"a": 1})
    assert checkpoint.verify(good) is None
    # One flipped byte inside the stored array data: the zip directory still opens.
    corrupt = checkpoint.save(tmp_path / "corrupt", 1, TREE)
    data = bytearray(corrupt.read_bytes())
    offset = data.find(np.arange(1000, 1001, dtype=np.float32).tobytes())
    assert offset > 0
    data[offset] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with np.load(corrupt) as opened:  # opening alone does not notice
        assert set(opened.files) == {"['w']", "['n']", "__meta__"}
    problem = checkpoint.verify(corrupt)
    assert problem is not None and str(corrupt) in problem
    # Metadata that is not JSON.
    bad_meta = tmp_path / "ckpt_0000000001.npz"
    np.savez(bad_meta, __meta__=np.frombuffer(b"{not json", dtype=np.uint8))
    assert checkpoint.verify(bad_meta) is not None
    truncated = checkpoint.save(tmp_path / "truncated", 1, TREE)
    _truncate(truncated)
    assert str(truncated) in checkpoint.verify(truncated)
