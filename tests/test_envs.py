"""Tests of envs/: observation shapes and dtypes per kind, Atari presets and life loss,
seeding, config errors, and human-normalised scores."""
import numpy as np
import pytest

from eosrl.envs.config import EnvConfig
from eosrl.envs.factory import EnvError, env_spec, frame_shape, frame_stack, make_env, validate_env_config
from eosrl.envs.scores import human_normalized_score


def _atari(game="Pong", preset="dopamine"):
    return EnvConfig(kind="atari", id=game, preset=preset)


@pytest.mark.parametrize("preset", ["dopamine", "nature"])
def test_atari_pong_stacked_uint8_frames(preset):
    env = make_env(_atari("Pong", preset), seed=0)
    obs, info = env.reset()
    assert obs.shape == (84, 84, 4) and obs.dtype == np.uint8
    assert env.observation_space.shape == (84, 84, 4)
    # At reset the stack is the reset frame repeated.
    assert all(np.array_equal(obs[..., 0], obs[..., k]) for k in range(1, 4))
    assert obs.any(), "the frame should not be blank"
    assert info["life_loss"] is False
    result = env.step(env.action_space.sample())
    assert len(result) == 5
    obs2, reward, terminated, truncated, info = result
    assert obs2.shape == (84, 84, 4) and obs2.dtype == np.uint8
    # The newest frame sits last; the older ones shift down by one slot.
    assert np.array_equal(obs2[..., 2], obs[..., 3])
    assert isinstance(reward, float) and not terminated and not truncated
    assert info["life_loss"] is False
    env.close()


def _life_loss_steps(preset, training, max_steps=1500):
    """Plays random Breakout actions until a life is lost; returns (life losses, lives left)."""
    env = make_env(_atari("breakout", preset), seed=1, training=training)
    env.reset()
    losses = 0
    for _ in range(max_steps):
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        losses += info["life_loss"]
        assert not terminated and not truncated, "the episode should outlast the first life"
        if info["lives"] < 5:
            break
    lives = info["lives"]
    env.close()
    return losses, lives


def test_nature_preset_reports_life_loss_while_episode_continues():
    losses, lives = _life_loss_steps("nature", training=True)
    assert lives == 4 and losses == 1


@pytest.mark.parametrize("preset,training", [("dopamine", True), ("nature", False)])
def test_no_life_loss_for_dopamine_or_evaluation(preset, training):
    losses, lives = _life_loss_steps(preset, training)
    assert lives == 4 and losses == 0


@pytest.mark.parametrize("game,channels", [("breakout", 4), ("space_invaders", 6), ("Seaquest", 10),
                                           ("MinAtar/Freeway", 7), ("asterix", 4)])
def test_minatar_bool_observations(game, channels):
    env = make_env(EnvConfig(kind="minatar", id=game), seed=0)
    obs, info = env.reset()
    assert obs.shape == (10, 10, channels) and obs.dtype == np.bool_ and obs.any()
    assert env.observation_space.dtype == np.bool_ and env.observation_space.contains(obs)
    assert env.action_space.n == 6 and info["life_loss"] is False
    obs, reward, terminated, truncated, info = env.step(0)
    assert obs.dtype == np.bool_ and info["life_loss"] is False
    env.close()


def test_cartpole_float32():
    env = make_env(EnvConfig(kind="gym", id="CartPole-v1"), seed=0)
    obs, info = env.reset()
    assert obs.shape == (4,) and obs.dtype == np.float32 and info["life_loss"] is False
    assert env.step(0)[4]["life_loss"] is False
    env.close()


def _minatar_rollout(seed, steps=200):
    env = make_env(EnvConfig(kind="minatar", id="space_invaders"), seed=seed)
    first, _ = env.reset()
    actions = np.random.default_rng(123).integers(0, 6, size=steps)
    rewards, observations = [], [first]
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(int(action))
        rewards.append(reward)
        observations.append(obs)
        if terminated or truncated:
            obs, _ = env.reset()
            observations.append(obs)
    env.close()
    return np.stack(observations), rewards


def test_minatar_same_seed_same_rollout():
    obs_a, rewards_a = _minatar_rollout(seed=7)
    obs_b, rewards_b = _minatar_rollout(seed=7)
    assert np.array_equal(obs_a, obs_b) and rewards_a == rewards_b
    assert sum(rewards_a) > 0, "the action sequence should score, or rewards prove nothing"
    obs_c, _ = _minatar_rollout(seed=8)
    assert obs_a.shape != obs_c.shape or not np.array_equal(obs_a, obs_c)


def test_atari_same_seed_same_first_observations():
    def first_obs(seed):
        env = make_env(_atari("Pong", "nature"), seed=seed)
        obs = [env.reset()[0]] + [env.step(a)[0] for a in (0, 1, 2, 3)]
        env.close()
        return np.stack(obs)
    assert np.array_equal(first_obs(3), first_obs(3))


def test_spec_and_frame_helpers():
    spec = env_spec(_atari("Pong"))
    assert (spec.obs_shape, spec.obs_dtype, spec.num_actions) == ((84, 84, 4), np.uint8, 6)
    assert spec.frame_shape == frame_shape(_atari()) == (84, 84) and spec.frame_stack == frame_stack(_atari()) == 4
    minatar = EnvConfig(kind="minatar", id="breakout")
    spec = env_spec(minatar)
    assert (spec.obs_shape, spec.frame_shape, spec.frame_stack) == ((10, 10, 4), (10, 10, 4), 1)
    assert spec.obs_dtype == np.bool_ and spec.num_actions == 6
    spec = env_spec(EnvConfig(kind="gym", id="CartPole-v1"))
    assert (spec.obs_shape, spec.num_actions, frame_stack(EnvConfig())) == ((4,), 2, 1)


@pytest.mark.parametrize("game,rom", [("ALE/Pong-v5", "pong"), ("space_invaders", "space_invaders"),
                                      ("SpaceInvaders", "space_invaders")])
def test_atari_id_forms(game, rom):
    env = make_env(_atari(game), seed=0)
    assert env.unwrapped._game == rom
    env.close()


@pytest.mark.parametrize("config,field,valid_name", [
    (EnvConfig(kind="atari", id="Pongg"), "env.id", "space_invaders"),
    (EnvConfig(kind="minatar", id="pacman"), "env.id", "space_invaders"),
    (EnvConfig(kind="minatar", id="MinAtar/Breakout-v1"), "env.id", "breakout"),
    (EnvConfig(kind="gym", id="NoSuchEnv-v0"), "env.id", "CartPole-v1"),
    (EnvConfig(kind="mujoco", id="Pong"), "env.kind", "minatar"),
])
def test_config_errors_name_the_field(config, field, valid_name):
    for check in (validate_env_config, lambda c: make_env(c, seed=0)):
        with pytest.raises(EnvError) as error:
            check(config)
        message = str(error.value)
        assert message.startswith(field + ":") and valid_name in message and "\n" not in message


def test_human_normalized_score():
    assert human_normalized_score("pong", 14.6) == 1.0
    assert human_normalized_score("pong", -20.7) == 0.0
    assert human_normalized_score("ALE/Breakout-v5", 30.5) == pytest.approx(1.0)
    assert human_normalized_score("SpaceInvaders", 148.0) == 0.0
    assert human_normalized_score("tetris", 10.0) is None
