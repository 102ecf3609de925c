"""The offline dataset layer: what the writer records is what the reader returns (across
shards, after a crash), subsets and corruption do exactly what they claim, damaged files
fail with one line naming the shard, and Dopamine replay logs import faithfully."""
import gzip
import json

import numpy as np
import pytest

from eosrl.envs.config import EnvConfig
from eosrl.agents.dataset import (DatasetError, DatasetReader, DatasetWriter, import_dqn_replay,
                            replay_into, shard_name)

FRAME = (3, 3)
PONG = {"kind": "atari", "id": "Pong", "preset": "dopamine"}


def _episode(rng, length, stack, end, dtype=np.uint8):
    """Ground truth of one episode: stack-1 older frames + length+1 observation frames."""
    return {"frames": rng.integers(0, 256, (stack - 1 + length + 1,) + FRAME).astype(dtype),
            "actions": rng.integers(0, 4, length).astype(np.int32),
            "rewards": rng.normal(size=length).round(2).astype(np.float32),
            "end": end}  # "terminal", "truncated" or "open"


def _obs(ep, t, stack):
    frames = ep["frames"][t:t + stack]
    return np.moveaxis(frames, 0, -1) if stack > 1 else frames[0]


def _feed(writer, ep, stack, steps=None):
    """Feeds an episode through the TransitionAdder-shaped API (optionally only `steps`)."""
    length = len(ep["actions"])
    writer.add_first(_obs(ep, 0, stack))
    for t in range(length if steps is None else steps):
        last = t == length - 1
        writer.add(ep["actions"][t], ep["rewards"][t], last and ep["end"] == "terminal",
                   last and ep["end"] == "truncated", _obs(ep, t + 1, stack))


def _write(path, episodes, stack, shard_size, dtype=np.uint8, env=PONG, close=True, **kwargs):
    writer = DatasetWriter(path, env=env, frame_shape=FRAME, frame_dtype=dtype, frame_stack=stack,
                           num_actions=4, shard_size=shard_size, agent={"kind": "dqn"}, **kwargs)
    for ep in episodes:
        _feed(writer, ep, stack)
    if close:
        writer.close()
    return writer


def _check_episode(got, want, stack):
    length = len(want["actions"])
    np.testing.assert_array_equal(got.frames, want["frames"])
    np.testing.assert_array_equal(got.actions, want["actions"])
    np.testing.assert_array_equal(got.rewards, want["rewards"])
    assert got.terminals.tolist() == [t == length - 1 and want["end"] == "terminal" for t in range(length)]
    assert got.truncations.tolist() == [t == length - 1 and want["end"] == "truncated" for t in range(length)]
    assert got.complete == (want["end"] != "open")
    for t in (0, length):
        np.testing.assert_array_equal(got.observation(t), _obs(want, t, stack))


@pytest.mark.parametrize("stack,dtype", [(4, np.uint8), (1, np.float32)])
def test_round_trip_across_shards_with_statistics(tmp_path, stack, dtype):
    rng = np.random.default_rng(0)
    ends = ["terminal", "truncated", "terminal", "open"]
    episodes = [_episode(rng, n, stack, end, dtype) for n, end in zip([5, 12, 1, 9], ends)]
    _write(tmp_path / "d", episodes, stack, shard_size=7, dtype=dtype)
    reader = DatasetReader(tmp_path / "d", verify="open")
    assert reader.num_shards > 4  # episodes span shards
    got = list(reader.iter_episodes())
    assert len(got) == 4
    first = 0
    for g, w in zip(got, episodes):
        _check_episode(g, w, stack)
        assert g.first_transition == first
        first += len(w["actions"])
    info = reader.info()
    returns = [float(np.sum(e["rewards"], dtype=np.float64)) for e in episodes[:3]]  # the open one is cut
    assert (info["transitions"], info["episodes"], info["complete_episodes"]) == (27, 4, 3)
    for key, value in {"mean": np.mean(returns), "std": np.std(returns), "min": min(returns),
                       "max": max(returns)}.items():
        assert info["returns"][key] == pytest.approx(value, abs=1e-9)
    assert info["size_bytes"] == sum(p.stat().st_size for p in (tmp_path / "d").iterdir())
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert (meta["format"], meta["version"], meta["closed"], meta["frame_stack"]) == ("eosrl-dataset", 1, True, stack)
    assert all(len(s["sha256"]) == 64 for s in meta["shards"])


def test_shards_are_written_as_the_run_goes_and_survive_a_crash(tmp_path):
    rng = np.random.default_rng(1)
    done, open_ep = _episode(rng, 6, 4, "terminal"), _episode(rng, 30, 4, "open")
    writer = DatasetWriter(tmp_path / "d", env=PONG, frame_shape=FRAME, frame_dtype=np.uint8,
                           frame_stack=4, num_actions=4, shard_size=10)
    _feed(writer, done, 4)
    _feed(writer, open_ep, 4, steps=15)  # ... and the process dies: no close()
    reader = DatasetReader(tmp_path / "d")
    assert not reader.meta["closed"] and reader.num_shards == 2
    got = list(reader.iter_episodes())
    _check_episode(got[0], done, 4)
    # The open episode ends where the last shard does, with its next observation kept.
    cut = got[1]
    assert not cut.complete and cut.length == reader.num_transitions - 6
    np.testing.assert_array_equal(cut.actions, open_ep["actions"][:cut.length])
    np.testing.assert_array_equal(cut.frames, open_ep["frames"][:3 + cut.length + 1])
    # A resumed writer appends; the crashed episode stays cut.
    again = _episode(rng, 3, 4, "terminal")
    resumed = DatasetWriter(tmp_path / "d", env=PONG, frame_shape=FRAME, frame_dtype=np.uint8,
                            frame_stack=4, num_actions=4, shard_size=10, resume=True)
    _feed(resumed, again, 4)
    resumed.close()
    got = list(DatasetReader(tmp_path / "d").iter_episodes())
    assert len(got) == 3 and got[1].length == cut.length
    _check_episode(got[2], again, 4)
    with pytest.raises(DatasetError, match="already holds a dataset"):
        DatasetWriter(tmp_path / "d", env=PONG, frame_shape=FRAME, frame_dtype=np.uint8, frame_stack=4,
                      num_actions=4)


def test_writer_for_env_records_a_real_env(tmp_path):
    from eosrl.envs.factory import make_env
    config = EnvConfig(kind="gym", id="CartPole-v1")
    env, rng = make_env(config, seed=0), np.random.default_rng(0)
    observations, steps = [], 0
    with DatasetWriter.for_env(tmp_path / "cp", config, agent={"kind": "random"}) as writer:
        obs, _ = env.reset()
        writer.add_first(obs)
        observations.append(obs)
        done = False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(int(rng.integers(2)))
            writer.add(int(rng.integers(2)), reward, terminated, truncated, obs)
            observations.append(obs)
            done, steps = terminated or truncated, steps + 1
        writer.note_progress(learner_step=0, env_step=steps)
    reader = DatasetReader(tmp_path / "cp")
    (episode,) = reader.iter_episodes()
    assert episode.complete and episode.length == steps and episode.episode_return == steps
    np.testing.assert_array_equal(episode.frames, np.stack(observations))
    assert reader.info()["collection"] == {"learner_steps": [0, 0], "env_steps": [steps, steps]}


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(2)
    episodes = [_episode(rng, n, 4, "terminal") for n in (8, 15, 4, 13)]
    for ep in episodes:
        ep["rewards"] = rng.choice([-1.0, 0.0, 2.0], len(ep["actions"])).astype(np.float32)
    _write(tmp_path / "d", episodes, 4, shard_size=9)
    return DatasetReader(tmp_path / "d"), episodes


def test_selectors_pick_what_they_claim(dataset):
    reader, _ = dataset
    n = reader.num_transitions
    assert n == 40
    assert reader.select("all").all()
    assert np.flatnonzero(reader.select("first", 7)).tolist() == list(range(7))
    assert np.flatnonzero(reader.select("last", 5)).tolist() == list(range(35, 40))
    a, b = reader.select("random", 12, seed=3), reader.select("random", 12, seed=3)
    assert a.sum() == 12 and np.array_equal(a, b)
    assert not np.array_equal(a, reader.select("random", 12, seed=4))
    with pytest.raises(DatasetError, match="count"):
        reader.select("first", n + 1)


def test_corruption_replaces_exactly_the_claimed_fraction(dataset):
    reader, episodes = dataset
    selection = reader.select("first", 20)
    actions = reader.corrupt(selection, 0.25, "actions", seed=1)
    assert len(actions.indices) == 5 and len(np.unique(actions.indices)) == 5
    assert set(actions.indices) <= set(range(20)) and np.all(np.diff(actions.indices) > 0)
    assert actions.values.dtype == np.int32 and np.all((0 <= actions.values) & (actions.values < 4))
    again = reader.corrupt(selection, 0.25, "actions", seed=1)
    assert np.array_equal(again.indices, actions.indices) and np.array_equal(again.values, actions.values)
    rewards = reader.corrupt(None, 0.5, "rewards", seed=2)
    assert len(rewards.indices) == 20 and set(rewards.values.tolist()) <= {-1.0, 0.0, 2.0}
    recorded = np.concatenate([e["rewards"] for e in episodes])
    flipped = reader.corrupt(None, 0.3, "rewards", seed=2, reward_method="flip")
    np.testing.assert_array_equal(flipped.values, -recorded[flipped.indices])


class _FakeAdder:
    def __init__(self):
        self.firsts, self.steps = [], []

    def add_first(self, obs):
        self.firsts.append(obs)

    def add(self, action, reward, terminated, truncated, next_obs, life_loss=False):
        self.steps.append((action, reward, terminated, next_obs, terminated or truncated))


def test_replay_into_pushes_selected_runs(dataset):
    reader, episodes = dataset
    adder = _FakeAdder()
    counts = replay_into(reader, adder)
    assert counts == {"transitions": 40, "runs": 4, "episodes": 4} and len(adder.steps) == 40
    assert [s[4] for s in adder.steps].count(True) == 4 and sum(s[2] for s in adder.steps) == 4
    np.testing.assert_array_equal(adder.firsts[1], _obs(episodes[1], 0, 4))
    np.testing.assert_array_equal(adder.steps[8][3], _obs(episodes[1], 1, 4))
    # Transitions 3..5 (episode 0) and 10..20 (episode 1 holds 8..22): both runs end at a gap.
    mask = np.zeros(40, bool)
    mask[3:6] = mask[10:21] = True
    corruption = reader.corrupt(mask, 1.0, "actions", seed=0)
    adder = _FakeAdder()
    counts = replay_into(reader, adder, mask, corruption, clip_rewards=True)
    assert counts == {"transitions": 14, "runs": 2, "episodes": 2} and len(adder.firsts) == 2
    np.testing.assert_array_equal(adder.firsts[1], _obs(episodes[1], 2, 4))
    assert [s[0] for s in adder.steps] == corruption.values.tolist()
    assert all(-1 <= s[1] <= 1 for s in adder.steps)
    assert [i for i, s in enumerate(adder.steps) if s[4]] == [2, 13]
    assert not any(s[2] for s in adder.steps)  # stopped at gaps: no terminal, they bootstrap


def _dataset_files(tmp_path):
    rng = np.random.default_rng(3)
    _write(tmp_path / "d", [_episode(rng, 10, 4, "terminal") for _ in range(3)], 4, shard_size=12)
    return tmp_path / "d"


def test_truncated_or_missing_shard_is_named(tmp_path):
    path = _dataset_files(tmp_path)
    shard = path / shard_name(1)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=r"shard_00001\.npz \(shard 1\): truncated") as e:
        DatasetReader(path)
    assert "\n" not in str(e.value)
    shard.unlink()
    with pytest.raises(DatasetError, match=r"shard_00001\.npz \(shard 1\): missing"):
        DatasetReader(path)


def test_checksum_mismatch_is_named(tmp_path):
    path = _dataset_files(tmp_path)
    shard = path / shard_name(2)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"shard_00002\.npz \(shard 2\): sha256 checksum mismatch"):
        DatasetReader(path, verify="open")
    lazy = DatasetReader(path)  # opens; fails when the shard is read
    with pytest.raises(DatasetError, match=r"shard 2\): sha256"):
        list(lazy.iter_episodes())


def test_bad_meta_version_and_wrong_env(tmp_path):
    path = _dataset_files(tmp_path)
    reader = DatasetReader(path)
    reader.check_env(EnvConfig(kind="atari", id="ALE/Pong-v5", preset="dopamine"))
    with pytest.raises(DatasetError, match=r"atari/Pong \(preset dopamine\).*atari/Breakout \(preset dopamine\)"):
        reader.check_env(EnvConfig(kind="atari", id="Breakout", preset="dopamine"))
    with pytest.raises(DatasetError, match="preset nature"):
        reader.check_env(EnvConfig(kind="atari", id="Pong", preset="nature"))
    with pytest.raises(DatasetError, match="gym/CartPole-v1"):
        reader.check_env(EnvConfig(kind="gym", id="CartPole-v1"))
    reader.check_frames((3, 3), np.uint8)
    with pytest.raises(DatasetError, match=r"meta.json: frames are uint8 \[3, 3\], but this env's replay stores "
                                           r"float32 \[3, 3\]"):
        reader.check_frames((3, 3), np.float32)  # e.g. recorded before MinAtar frames became bool
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "version": 2}))
    with pytest.raises(DatasetError, match="version 2 is not supported"):
        DatasetReader(path)


# ----------------------------------------------------------------------------
# DQN Replay Dataset import, on synthetic logs in Dopamine's exact file format.


def _save_gz(path, array):
    with gzip.open(path, "wb", compresslevel=1) as f:
        np.save(f, array)


def _dopamine_logs(directory, lengths, ckpt_size, rows, rng):
    """Episodes laid out as Dopamine's replay buffer logs them (3 zero rows before each
    episode, terminal on the last step), the first `rows` rows cut into checkpoints."""
    obs, act, rew, term, episodes = [], [], [], [], []
    for length in lengths:
        frames = rng.integers(1, 256, (length, 84, 84), dtype=np.uint8)
        actions, rewards = rng.integers(0, 6, length), rng.choice([-1.0, 0.0, 1.0], length)
        episodes.append((frames, actions, rewards))
        obs += [np.zeros((3, 84, 84), np.uint8), frames]
        act += [np.zeros(3, int), actions]
        rew += [np.zeros(3), rewards]
        term += [np.zeros(3), np.arange(length) == length - 1]
    arrays = {"observation": np.concatenate(obs), "action": np.concatenate(act).astype(np.int32),
              "reward": np.concatenate(rew).astype(np.float32), "terminal": np.concatenate(term).astype(np.uint8)}
    directory.mkdir()
    for n, lo in enumerate(range(0, rows, ckpt_size)):
        for key, array in arrays.items():
            _save_gz(directory / f"$store$_{key}_ckpt.{n}.gz", array[lo:min(lo + ckpt_size, rows)])
    return episodes


def _check_imported(got, want, complete=True):
    frames, actions, rewards = want
    length = len(actions) if complete else got.length
    assert got.length == length and got.complete == complete
    np.testing.assert_array_equal(got.frames[:3], 0)
    np.testing.assert_array_equal(got.frames[3:3 + length], frames[:length])
    np.testing.assert_array_equal(got.actions, actions[:length])
    np.testing.assert_array_equal(got.rewards, rewards[:length])
    assert got.terminals.tolist() == [complete and t == length - 1 for t in range(length)]


def test_import_dqn_replay_chronological_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    # Checkpoints hold rows 0-249 and 250-499: episode 1 (rows 203-385) spans both, and
    # episode 2 (rows 386-) is still running when the logs end: 111 steps, no terminal.
    logs = tmp_path / "logs"
    episodes = _dopamine_logs(logs, [200, 180, 120], ckpt_size=250, rows=500, rng=rng)
    summary = import_dqn_replay(logs, tmp_path / "pong", None, "Pong", num_actions=6,
                                layout="chronological", shard_size=128, chunk_rows=100)
    assert summary["checkpoints"] == [0, 1] and summary["skipped_rows"] == 0 and summary["cut_steps"] == 1
    reader = DatasetReader(tmp_path / "pong", verify="open")
    reader.check_env(EnvConfig(kind="atari", id="Pong", preset="dopamine"))
    info = reader.info()
    assert (info["frame_shape"], info["frame_stack"], info["rewards_clipped"]) == ((84, 84), 4, True)
    got = list(reader.iter_episodes())
    assert len(got) == 3
    _check_imported(got[0], episodes[0])
    _check_imported(got[1], episodes[1])
    np.testing.assert_array_equal(got[1].frames[-1], 0)  # Dopamine logs no final observation
    _check_imported(got[2], episodes[2], complete=False)
    assert got[2].length == 110  # the last logged step has no next frame
    assert info["returns"]["count"] == 2
    assert info["returns"]["mean"] == pytest.approx(np.mean([e[2].sum() for e in episodes[:2]]))

    # Checkpoint 1 alone: the episode begun in checkpoint 0 is skipped up to its terminal.
    summary = import_dqn_replay(logs, tmp_path / "tail", [1], "Pong", num_actions=6, layout="chronological")
    assert summary["skipped_rows"] == 3 + 200 + 3 + 180 - 250
    got = list(DatasetReader(tmp_path / "tail").iter_episodes())
    assert len(got) == 1
    _check_imported(got[0], episodes[2], complete=False)

    (logs / "$store$_reward_ckpt.1.gz").unlink()
    with pytest.raises(DatasetError, match=r"\$store\$_reward_ckpt\.1\.gz: missing \(checkpoint 1\)"):
        import_dqn_replay(logs, tmp_path / "none", [0, 1], "Pong", num_actions=6)


class _LoggedBuffer:
    """Dopamine's circular replay buffer (zero padding before each episode) with batch_rl's
    logger: saved whenever add_count % cap == cap - 1, and once more at the end with the
    cursor as add_count, the way the DQN Replay Dataset was written."""

    def __init__(self, directory, cap):
        directory.mkdir()
        self.directory, self.cap, self.add_count, self.log_count = directory, cap, 0, 0
        # Never-written rows hold junk (Dopamine allocates with np.empty).
        self.store = {"observation": np.full((cap, 84, 84), 7, np.uint8), "action": np.full(cap, 99, np.int32),
                      "reward": np.full(cap, 5, np.float32), "terminal": np.ones(cap, np.uint8)}

    def _add(self, frame, action, reward, terminal):
        i = self.add_count % self.cap
        for key, value in zip(self.store, (frame, action, reward, terminal)):
            self.store[key][i] = value
        self.add_count += 1

    def add(self, frame, action, reward, terminal):
        if self.add_count == 0 or self.store["terminal"][(self.add_count - 1) % self.cap]:
            for _ in range(3):
                self._add(0, 0, 0, 0)
        self._add(frame, action, reward, terminal)
        if self.add_count % self.cap == self.cap - 1:
            self._log(self.add_count)

    def _log(self, add_count):
        for key, array in self.store.items():
            _save_gz(self.directory / f"$store$_{key}_ckpt.{self.log_count}.gz", array)
        _save_gz(self.directory / f"add_count_ckpt.{self.log_count}.gz", np.array(add_count))
        self.log_count += 1

    def log_final_buffer(self):
        self._log(self.add_count % self.cap)


def test_import_dqn_replay_as_batch_rl_logged_it(tmp_path):
    rng = np.random.default_rng(5)
    logs = _LoggedBuffer(tmp_path / "logs", cap=250)
    episodes = []
    # Adds: episode 0 at 0-202, 1 at 203-385, 2 at 386-538, 3 at 539-641 (100 of its 120
    # steps); logs after 249 and 499 adds, and a final one with cursor 142.
    for length, logged in [(200, 200), (180, 180), (150, 150), (120, 100)]:
        frames = rng.integers(1, 256, (length, 84, 84), dtype=np.uint8)
        actions, rewards = rng.integers(0, 6, length), rng.choice([-1.0, 0.0, 1.0], length)
        episodes.append((frames, actions, rewards))
        for t in range(logged):
            logs.add(frames[t], actions[t], rewards[t], t == length - 1)
    logs.log_final_buffer()
    assert logs.log_count == 3

    summary = import_dqn_replay(logs.directory, tmp_path / "all", None, "Pong", num_actions=6, chunk_rows=64)
    assert (summary["rows_read"], summary["skipped_rows"], summary["cut_steps"]) == (642, 0, 1)
    got = list(DatasetReader(tmp_path / "all").iter_episodes())
    assert len(got) == 4
    for g, w in zip(got[:3], episodes):  # episodes 1 and 2 span checkpoints
        _check_imported(g, w)
    _check_imported(got[3], episodes[3], complete=False)
    assert got[3].length == 99

    # Checkpoints 0 and 2: episode 1 is cut where checkpoint 0 ends (adds 206-248: 43
    # observations, 42 steps); checkpoint 2 is skipped up to episode 2's terminal.
    summary = import_dqn_replay(logs.directory, tmp_path / "gap", [0, 2], "Pong", num_actions=6)
    assert summary["skipped_rows"] == 539 - 499 and summary["cut_steps"] == 2
    got = list(DatasetReader(tmp_path / "gap").iter_episodes())
    assert [g.length for g in got] == [200, 42, 99]
    _check_imported(got[1], episodes[1], complete=False)
    _check_imported(got[2], episodes[3], complete=False)
