"""The DQN Replay Dataset importer on what Dopamine's replay buffer writes besides a run's
regular logs: a log batch_rl skipped (the first one too), Dopamine's own saves at any fill
level or cursor, a checkpoint after the final log, and refusals that leave nothing behind.

The buffers come from `_DopamineBuffer`, a reproduction of Dopamine's `OutOfGraphReplayBuffer`
(the version batch_rl logged the dataset with) and of batch_rl's logging: Dopamine itself
(dopamine-rl) cannot be installed next to our pins (it needs tensorflow rather than
tensorflow-cpu, tf-keras >= 2.18, gym, flax, ...)."""
import gzip
import json

import numpy as np
import pytest

from eosrl.agents.dataset import DatasetError, DatasetReader, import_dqn_replay

STACK = 4          # Dopamine's Atari stack
FRAME = (84, 84)


def _save_gz(path, array):
    # Dopamine writes np.save into a GzipFile; level 1 only to keep the tests quick.
    with gzip.open(path, "wb", compresslevel=1) as f:
        np.save(f, array, allow_pickle=False)


class _DopamineBuffer:
    """Dopamine's circular replay buffer as it lays out and saves its arrays, with batch_rl's
    logger (`logged=True`) on top.

    An add() call first adds STACK - 1 zero rows when the buffer is empty or the previous
    row is terminal; every row goes to `add_count % cap`. A save writes each store array
    (`$store$_<key>_ckpt.<n>.gz`) and the public attributes `add_count` (a 0-d int64
    array) and `invalid_range`, each with np.save into a gzip stream. batch_rl's logger
    saves after an add() call that leaves `add_count % cap == cap - 1`, so a call whose
    padding passes that point skips the log; `log_final_buffer` saves with the cursor as
    add_count. Dopamine's own `save` (each iteration) stores the true add_count.
    """

    def __init__(self, directory, cap, logged=True):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.cap, self.logged = directory, cap, logged
        self.add_count = np.array(0)
        self.invalid_range = np.zeros(STACK)  # Dopamine's initial value (floats)
        # Allocated with np.empty, which for big arrays gives zero pages: rows never written
        # look like padding rows.
        self.store = {"observation": np.zeros((cap,) + FRAME, np.uint8), "action": np.zeros(cap, np.int32),
                      "reward": np.zeros(cap, np.float32), "terminal": np.zeros(cap, np.uint8)}
        self.log_count = 0
        self.skipped = []  # add counts at which batch_rl's logger skipped a log

    def cursor(self):
        return self.add_count % self.cap

    def _add(self, frame, action, reward, terminal):
        cursor = self.cursor()
        for key, value in zip(self.store, (frame, action, reward, terminal)):
            self.store[key][cursor] = value
        self.add_count += 1
        horizon = 1
        self.invalid_range = np.array([(self.cursor() - horizon + i) % self.cap for i in range(STACK + horizon)])

    def add(self, frame, action, reward, terminal):
        start = int(self.add_count)
        if self.add_count == 0 or self.store["terminal"][self.cursor() - 1] == 1:
            for _ in range(STACK - 1):
                self._add(np.zeros(FRAME, np.uint8), 0, 0.0, 0)
        self._add(frame, action, reward, terminal)
        if not self.logged:
            return
        if self.cursor() == self.cap - 1:
            self.save(self.log_count)
            self.log_count += 1
        elif any(a % self.cap == self.cap - 1 for a in range(start + 1, int(self.add_count))):
            self.skipped.append(int(self.add_count))

    def save(self, suffix):
        arrays = {"$store$_" + key: array for key, array in self.store.items()}
        arrays.update(add_count=self.add_count, invalid_range=self.invalid_range)
        for name, array in arrays.items():
            _save_gz(self.directory / f"{name}_ckpt.{suffix}.gz", array)

    def log_final_buffer(self):
        add_count, self.add_count = self.add_count, np.array(self.cursor())
        self.save(self.log_count)
        self.log_count += 1
        self.add_count = add_count


def _play(buffer, lengths, rng, logged=None, saves=()):
    """Plays episodes of `lengths` steps into `buffer` (the last one stops after `logged`
    steps when given), Dopamine-saving as iteration i once add_count reaches saves[i].
    Returns each episode's frames, actions and rewards."""
    episodes, saves = [], list(saves)
    for e, length in enumerate(lengths):
        frames = rng.integers(1, 256, (length,) + FRAME, dtype=np.uint8)
        actions, rewards = rng.integers(0, 6, length), rng.choice([-1.0, 0.0, 1.0], length)
        episodes.append((frames, actions, rewards))
        steps = logged if logged is not None and e == len(lengths) - 1 else length
        for t in range(steps):
            buffer.add(frames[t], actions[t], rewards[t], t == length - 1)
            if saves and buffer.add_count >= saves[0]:
                assert buffer.add_count == saves[0]  # the test's arithmetic
                buffer.save(buffer.log_count)
                buffer.log_count += 1
                saves.pop(0)
    assert not saves
    return episodes


def _check(got, want, steps=None):
    """An imported episode against its truth: complete, or cut after `steps` steps."""
    frames, actions, rewards = want
    complete = steps is None
    steps = len(actions) if complete else steps
    assert (got.length, got.complete) == (steps, complete)
    np.testing.assert_array_equal(got.frames[:STACK - 1], 0)  # Dopamine's zero padding
    np.testing.assert_array_equal(got.frames[STACK - 1:-1], frames[:steps])
    # The final row: a cut episode's last logged observation; zero after a terminal
    # (Dopamine logs no observation after it).
    np.testing.assert_array_equal(got.frames[-1], 0 if complete else frames[steps])
    np.testing.assert_array_equal(got.actions, actions[:steps])
    np.testing.assert_array_equal(got.rewards, rewards[:steps])
    assert got.terminals.tolist() == [complete and t == steps - 1 for t in range(steps)]


def _import(buffer, dst, checkpoints=None, **kwargs):
    summary = import_dqn_replay(buffer.directory, dst, checkpoints, "Pong", num_actions=6, chunk_rows=64, **kwargs)
    return summary, list(DatasetReader(dst, verify="open").iter_episodes())


def test_final_log_after_a_skipped_log_starts_at_an_episode(tmp_path):
    rng = np.random.default_rng(10)
    logs = _DopamineBuffer(tmp_path / "logs", cap=250)
    # Adds: episode 0 at 0-202, 1 at 203-385, 2 at 386-538, 3 at 539-745, 4 at 746-778
    # (its padding lands on rows 246-248, so the log at add_count 749 is skipped), 5 from
    # 779 (60 of its steps). Logs: 0 at 249, 1 at 499, then the final one (cursor 92).
    episodes = _play(logs, [200, 180, 150, 204, 30, 150], rng, logged=60)
    assert logs.skipped == [750] and logs.log_count == 2
    logs.log_final_buffer()

    summary, got = _import(logs, tmp_path / "pong")
    # Checkpoint 1 ends inside episode 2 (its observations up to add 498: 109 steps); the
    # final log holds adds 749-841, not their successors: it starts at episode 5.
    assert [g.length for g in got] == [200, 180, 109, 59]
    _check(got[0], episodes[0])
    _check(got[1], episodes[1])
    _check(got[2], episodes[2], steps=109)
    _check(got[3], episodes[5], steps=59)
    assert (summary["skipped_rows"], summary["cut_steps"], summary["rows_read"]) == (30, 2, 249 + 250 + 93)
    assert summary["joined"] == [2]


def test_skipped_first_log_starts_at_an_episode(tmp_path):
    rng = np.random.default_rng(11)
    logs = _DopamineBuffer(tmp_path / "logs", cap=250)
    # Adds: episode 0 at 0-245 (episode 1's padding on rows 246-248 skips the first log),
    # 1 at 246-448, 2 at 449-601, 3 from 602 (80 of its steps). Log 0 at add_count 499
    # holds adds 249-498, the final log adds 499-684 (cursor 185).
    episodes = _play(logs, [243, 200, 150, 100], rng, logged=80)
    assert logs.skipped == [250] and logs.log_count == 1
    logs.log_final_buffer()

    summary, got = _import(logs, tmp_path / "pong")
    assert [g.length for g in got] == [150, 79]
    _check(got[0], episodes[2])  # spans both checkpoints
    _check(got[1], episodes[3], steps=79)
    assert (summary["skipped_rows"], summary["cut_steps"], summary["rows_read"]) == (200, 1, 250 + 186)
    assert summary["joined"] == [0]  # it holds no episode start of the run


def test_saves_before_the_buffer_filled_continue_each_other(tmp_path):
    rng = np.random.default_rng(12)
    buffer = _DopamineBuffer(tmp_path / "ckpts", cap=250, logged=False)
    # Dopamine's own saves after 120 and 230 adds (of 250 rows): episode 0 at 0-102,
    # 1 at 103-165 (it spans the saves), 2 from 166 (61 of its steps).
    episodes = _play(buffer, [100, 60, 100], rng, logged=61, saves=[120, 230])

    summary, got = _import(buffer, tmp_path / "pong")
    assert [g.length for g in got] == [100, 60, 60]
    _check(got[0], episodes[0])
    _check(got[1], episodes[1])
    _check(got[2], episodes[2], steps=60)
    assert (summary["skipped_rows"], summary["cut_steps"], summary["rows_read"]) == (0, 1, 230)
    assert summary["joined"] == []

    # A save from another run where the add counts say rows 0-119 are unchanged: refused.
    other = _DopamineBuffer(tmp_path / "other", cap=250, logged=False)
    _play(other, [100, 60, 100], np.random.default_rng(13), logged=61, saves=[120, 230])
    for name in ("observation", "action", "reward", "terminal"):
        (other.directory / f"$store$_{name}_ckpt.0.gz").rename(buffer.directory / f"$store$_{name}_ckpt.0.gz")
    with pytest.raises(DatasetError, match=r"ckpt\.1\.gz: row \d+ .*differs from checkpoint 0") as error:
        _import(buffer, tmp_path / "mixed")
    assert "\n" not in str(error.value)


def test_saves_at_any_cursor_join_or_continue(tmp_path):
    rng = np.random.default_rng(14)
    buffer = _DopamineBuffer(tmp_path / "ckpts", cap=250, logged=False)
    # Episodes 0 at 0-102, 1 at 103-165, 2 at 166-318, 3 at 319-441, 4 at 442-644, 5 from
    # 645 (52 steps). Saves after 120 adds, 300 (wrapped: adds 50-299, 50-119 shared) and
    # 700 (adds 450-699: 300-449 are lost, so it starts after episode 4's terminal).
    episodes = _play(buffer, [100, 60, 150, 120, 200, 180], rng, logged=52, saves=[120, 300, 700])

    summary, got = _import(buffer, tmp_path / "pong")
    assert [g.length for g in got] == [100, 60, 130, 51]
    _check(got[0], episodes[0])
    _check(got[1], episodes[1])
    _check(got[2], episodes[2], steps=130)
    _check(got[3], episodes[5], steps=51)
    assert (summary["skipped_rows"], summary["cut_steps"], summary["rows_read"]) == (195, 2, 120 + 180 + 250)
    assert summary["joined"] == [2]


def _logged_run(directory, rng):
    """A regular run: episode 0 at adds 0-202, 1 at 203-385, 2 at 386-538, 3 from 539
    (100 steps); logs 0 and 1 at add_count 249 and 499, final log 2 with cursor 142."""
    logs = _DopamineBuffer(directory, cap=250)
    episodes = _play(logs, [200, 180, 150, 120], rng, logged=100)
    logs.log_final_buffer()
    return logs, episodes


def test_checkpoint_after_the_final_log_is_refused(tmp_path):
    logs, episodes = _logged_run(tmp_path / "logs", np.random.default_rng(15))
    # The run went on after its final log (as a resumed one would): log 3 at add_count 749.
    _play(logs, [150], np.random.default_rng(16), logged=107)
    assert logs.log_count == 4
    dst = tmp_path / "pong"
    with pytest.raises(DatasetError, match=r"ckpt\.3\.gz: checkpoint 3 follows checkpoint 2, a final log") as error:
        _import(logs, dst)
    assert "\n" not in str(error.value) and not dst.exists()

    # Without the final log, log 3 continues log 1.
    summary, got = _import(logs, dst, [0, 1, 3])
    assert summary["rows_read"] == 749 and [g.length for g in got[:3]] == [200, 180, 150]
    for g, w in zip(got, episodes[:3]):
        _check(g, w)


def _meta_closed(path):
    return json.loads((path / "meta.json").read_text())["closed"]


def test_refused_import_leaves_no_half_written_destination(tmp_path):
    logs, _ = _logged_run(tmp_path / "logs", np.random.default_rng(17))
    # Episode 2's padding (adds 386-388) is on rows 136-138 of log 1: spoil one.
    path = logs.directory / "$store$_observation_ckpt.1.gz"
    with gzip.open(path, "rb") as f:
        frames = np.load(f)
    frames[137, 5, 5] = 1
    _save_gz(path, frames)
    message = r"observation_ckpt\.1\.gz row 137: expected Dopamine's zero padding row"

    # The destination did not exist (nor its parent): neither is left behind, although
    # shards of checkpoint 0 had been written.
    dst = tmp_path / "out" / "pong"
    with pytest.raises(DatasetError, match=message):
        _import(logs, dst, shard_size=64)
    assert not (tmp_path / "out").exists()

    # It existed, with a file in it: left as it was.
    dst.mkdir(parents=True)
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match=message):
        _import(logs, dst, shard_size=64)
    assert [p.name for p in dst.iterdir()] == ["notes.txt"] and (dst / "notes.txt").read_text() == "mine"

    # Sanity: the same import without the spoilt row completes and is closed.
    frames[137, 5, 5] = 0
    _save_gz(path, frames)
    _import(logs, dst, shard_size=64)
    assert _meta_closed(dst)
