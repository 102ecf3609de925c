"""The Reverb adder writes exactly the n-step transitions the docstring promises,
with frame stacks padded at episode starts and shared frames stored once."""
import jax
import numpy as np
import pytest
import reverb

from eosrl.agents import replay


def _server(frame_shape, dtype, stack, n, capacity=1000):
    layout = replay.ItemLayout(frame_shape, dtype, stack, n)
    server = replay.start_server([replay.replay_table(capacity, 1, layout.signature())])
    return server, reverb.Client(f"localhost:{server.port}"), layout


def _all_items(client, layout, count):
    """Every item of the table, keyed by action (each test step uses its own action)."""
    batch = layout.unpacked(replay.sample_items(client, count * 50, layout.signature()))
    return {int(a): {k: v[i] for k, v in batch.items()} for i, a in enumerate(batch["action"])}


def _stacked_obs(frames, t, stack):
    """What a reset-padded frame stack shows at step t: frames t-stack+1..t, clamped at 0."""
    return np.stack([frames[max(0, i)] for i in range(t - stack + 1, t + 1)], axis=-1)


@pytest.mark.parametrize("terminal", [True, False])
@pytest.mark.parametrize("length", [6, 1])  # 1: an episode shorter than n, all its windows padded
def test_n_step_returns_and_frame_stacks(terminal, length):
    stack, n, gamma = 4, 3, 0.9
    server, client, layout = _server((2, 2), np.uint8, stack, n)
    assert tuple(sorted(layout.signature())) == replay.ITEM_FIELDS
    adder = replay.TransitionAdder(client, n_step=n, discount=gamma, frame_stack=stack)
    frames = [np.full((2, 2), 10 * t + 1, np.uint8) for t in range(length + 1)]
    rewards = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    adder.add_first(_stacked_obs(frames, 0, stack))
    for t in range(length):
        last = t == length - 1
        adder.add(action=t, reward=rewards[t], terminated=terminal and last, truncated=last and not terminal,
                  next_obs=_stacked_obs(frames, t + 1, stack))
    adder.flush()
    assert adder.items_written == length
    items = _all_items(client, layout, length)
    assert sorted(items) == list(range(length))
    for t in range(length):
        end = min(t + n, length)
        expected_return = sum(gamma ** (i - t) * rewards[i] for i in range(t, end))
        expected_discount = 0.0 if (terminal and end == length) else gamma ** (end - t)
        item = items[t]
        assert float(item["reward"]) == pytest.approx(expected_return, rel=1e-6)
        assert float(item["discount"]) == pytest.approx(expected_discount, rel=1e-6)
        assert item["steps"] == end - t
        obs = np.moveaxis(item["obs"], 0, -1)
        next_obs = np.moveaxis(item["next_obs"], 0, -1)
        np.testing.assert_array_equal(obs, _stacked_obs(frames, t, stack))
        np.testing.assert_array_equal(next_obs, _stacked_obs(frames, end, stack))
    server.stop()


def test_episode_boundary_does_not_leak_frames_and_life_loss_stops_bootstrap():
    server, client, layout = _server((3,), np.float32, 1, 2)
    adder = replay.TransitionAdder(client, n_step=2, discount=0.5, frame_stack=1)
    obs = lambda v: np.full((3,), v, np.float32)  # noqa: E731
    # Episode 1: two steps, terminal.
    adder.add_first(obs(0))
    adder.add(0, 1.0, False, False, obs(1))
    adder.add(1, 1.0, True, False, obs(2))
    # Episode 2: a life loss (terminal for bootstrapping) in the middle of the episode.
    adder.add_first(obs(100))
    adder.add(2, 1.0, False, False, obs(101), life_loss=True)
    adder.add(3, 7.0, False, False, obs(102))
    adder.add(4, 0.0, False, True, obs(103))   # time limit: bootstrap from obs 103
    adder.flush()
    items = _all_items(client, layout, 5)
    assert float(items[0]["reward"]) == pytest.approx(1.5) and float(items[0]["discount"]) == 0.0
    np.testing.assert_array_equal(items[0]["next_obs"][0], obs(2))
    np.testing.assert_array_equal(items[2]["obs"][0], obs(100))   # no frame of episode 1
    assert float(items[2]["reward"]) == pytest.approx(1.0)         # 7.0 after the life loss is excluded
    assert float(items[2]["discount"]) == 0.0
    assert float(items[3]["reward"]) == pytest.approx(7.0)
    assert float(items[3]["discount"]) == pytest.approx(0.25)      # γ² from obs 103 (truncated)
    np.testing.assert_array_equal(items[3]["next_obs"][0], obs(103))
    assert float(items[4]["discount"]) == pytest.approx(0.5)
    server.stop()


def test_layout_to_transition_restores_env_layout_and_next_obs_steps_on():
    layout = replay.ItemLayout((3, 3), np.int32, 4, 2)
    frames = np.arange(2 * 6 * 3 * 3, dtype=np.int32).reshape(2, 6, 3, 3)  # two windows of stack + n frames
    # Item 0 bootstraps from 2 steps on, item 1 (an episode's end) from 1.
    data = layout.items(frames[:, :4], [2, 17], [0.5, -1.0], [0.99, 0.0],
                        np.stack([frames[0, 2:6], frames[1, 1:5]]), steps=[2, 1])
    batch = jax.jit(layout.to_transition)(data)
    assert batch.obs.shape == batch.next_obs.shape == (2, 3, 3, 4)
    np.testing.assert_array_equal(np.asarray(batch.obs)[1, :, :, 2], frames[1, 2])
    np.testing.assert_array_equal(np.moveaxis(np.asarray(batch.next_obs)[0], -1, 0), frames[0, 2:6])
    np.testing.assert_array_equal(np.moveaxis(np.asarray(batch.next_obs)[1], -1, 0), frames[1, 1:5])
    # The packed transition: (action, n-step return, discount), the action back as int32.
    assert batch.action.dtype == np.int32 and list(np.asarray(batch.action)) == [2, 17]
    np.testing.assert_array_equal(batch.reward, [0.5, -1.0])
    np.testing.assert_array_equal(batch.discount, np.float32([0.99, 0.0]))
    # The host view reads the same items.
    view = layout.unpacked(data)
    np.testing.assert_array_equal(view["next_obs"][1], frames[1, 1:5])
    assert list(view["steps"]) == [2, 1]
    flat = replay.ItemLayout((3,), np.bool_, 1, 1)
    bools = np.arange(2 * 3).reshape(2, 1, 3) % 2 == 1
    batch = flat.to_transition(flat.items(bools, [1, 2], [0.0, 0.0], [1.0, 1.0], ~bools))
    assert batch.obs.shape == (2, 3) and batch.obs.dtype == np.bool_
    np.testing.assert_array_equal(batch.next_obs, ~bools[:, 0])
