"""Unit tests of the actor's wiring (env -> adder / recorder / episode stats), the
evaluator, and the `eosrl evaluate --video` GIF, on a scripted fake env (no gym, no Reverb).
"""
import jax
import numpy as np
import pytest

from conftest import CONFIGS
from eosrl.agents import networks
from eosrl.agents.actor import Actor, Evaluator
from eosrl.agents.config import AgentConfig
from eosrl.launch.config import load_config

OBS_DIM, NUM_ACTIONS = 2, 2
# Episodes as (reward, terminated, truncated, info) per step. Episode 0 loses a life at
# its first step and terminates; episode 1 loses a life and is truncated.
SCRIPT = [
    [(5.0, False, False, {"life_loss": True}), (-3.0, False, False, {}), (0.5, True, False, {})],
    [(2.0, False, False, {"life_loss": True}), (-0.25, False, True, {})],
]
RAW_RETURNS = [2.5, 1.75]


class ScriptedEnv:
    """Plays SCRIPT-like episodes in order; refuses to step a finished episode."""

    def __init__(self, script, obs_dim=OBS_DIM):
        self.script, self.obs_dim = script, obs_dim
        self.episode, self.t = -1, 0
        self.reset_seeds, self.actions, self.reset_obs, self.step_obs = [], [], [], []
        self.done = True

    def _obs(self):
        return np.full(self.obs_dim, 10.0 * self.episode + self.t, np.float32)

    def reset(self, seed=None):
        self.episode, self.t, self.done = self.episode + 1, 0, False
        assert self.episode < len(self.script), "reset past the end of the script"
        self.reset_seeds.append(seed)
        obs = self._obs()
        self.reset_obs.append(obs)
        return obs, {}

    def step(self, action):
        assert not self.done, "step after the episode ended, without a reset"
        reward, terminated, truncated, info = self.script[self.episode][self.t]
        self.actions.append(int(action))
        self.t += 1
        self.done = terminated or truncated
        obs = self._obs()
        self.step_obs.append(obs)
        return obs, reward, terminated, truncated, dict(info)

    def render(self):
        # Distinct 5x5 frames: the value encodes (episode, step).
        return np.full((5, 5, 3), 20 * self.t + 100 * self.episode, np.uint8)


class RecordingAdder:
    """An `Adder` that records its calls."""

    def __init__(self):
        self.calls = []

    def add_first(self, obs):
        self.calls.append(("first", np.array(obs)))

    def add(self, action, reward, terminated, truncated, next_obs, life_loss=False):
        self.calls.append(("add", dict(action=action, reward=reward, terminated=terminated,
                                       truncated=truncated, next_obs=np.array(next_obs),
                                       life_loss=life_loss)))

    def adds(self, key):
        return [call[1][key] for call in self.calls if call[0] == "add"]


AGENT = AgentConfig(kind="dqn", network="mlp", hidden_sizes=[4])


@pytest.fixture(scope="module")
def network():
    return networks.make_network(AGENT, "gym", (OBS_DIM,), NUM_ACTIONS)


@pytest.fixture(scope="module")
def acted(network):
    """An actor stepped through both scripted episodes; what it returned and handed on."""
    env, adder, recorder = ScriptedEnv(SCRIPT), RecordingAdder(), RecordingAdder()
    actor = Actor(env, network, AGENT, adder, seed=0, clip_rewards=True, recorder=recorder)
    actor.update_params(*network.init(jax.random.PRNGKey(0)))
    ended = [actor.step() for _ in range(sum(len(e) for e in SCRIPT))]
    return {"env": env, "adder": adder, "recorder": recorder, "actor": actor, "ended": ended}


def test_adder_gets_clipped_rewards_and_recorder_raw_rewards(acted):
    """Breaks if clipping is skipped for the adder, or applied to what the recorder keeps."""
    assert acted["adder"].adds("reward") == [1.0, -1.0, 0.5, 1.0, -0.25]
    assert acted["recorder"].adds("reward") == [5.0, -3.0, 0.5, 2.0, -0.25]


def test_life_loss_is_passed_on_but_does_not_end_the_episode(acted):
    """Breaks if a life loss ends the episode (reset, stats) or becomes `terminated`, or if
    the flag is dropped on the way to the adder or the recorder."""
    assert acted["ended"] == [False, False, True, False, True]
    assert acted["env"].reset_seeds == [0, None]  # two episodes, two resets; only the first seeded
    for sink in (acted["adder"], acted["recorder"]):
        assert sink.adds("life_loss") == [True, False, False, True, False]
        assert sink.adds("terminated") == [False, False, True, False, False]
        assert sink.adds("truncated") == [False, False, False, False, True]


def test_episode_stats_record_raw_returns_and_lengths(acted):
    """Breaks if episode returns sum the clipped rewards or episodes end on a life loss."""
    stats = acted["actor"].stats
    assert stats.returns == pytest.approx(RAW_RETURNS)
    assert stats.lengths == [3, 2]
    assert acted["actor"].steps == 5


def test_add_first_follows_each_reset_with_the_reset_observation(acted):
    """Breaks if add_first is skipped, sent another observation, or `add` gets the wrong
    action or next observation."""
    env = acted["env"]
    for sink in (acted["adder"], acted["recorder"]):
        kinds = [call[0] for call in sink.calls]
        assert kinds == ["first", "add", "add", "add", "first", "add", "add"]
        firsts = [call[1] for call in sink.calls if call[0] == "first"]
        for got, want in zip(firsts, env.reset_obs, strict=True):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(sink.adds("next_obs"), env.step_obs, strict=True):
            np.testing.assert_array_equal(got, want)
        assert sink.adds("action") == env.actions


def test_evaluator_returns_are_raw_sums_and_life_loss_does_not_end_episodes(network):
    """Breaks if the evaluator clips rewards, stops at a life loss, or reuses its reset seed."""
    env = ScriptedEnv(SCRIPT)
    params, net_state = network.init(jax.random.PRNGKey(0))
    result = Evaluator(env, network, epsilon=0.0, seed=5).run(params, net_state, episodes=2)
    assert result["return_mean"] == pytest.approx(np.mean(RAW_RETURNS))
    assert result["return_max"] == pytest.approx(2.5)
    assert result["return_min"] == pytest.approx(1.75)
    assert result["episode_length_mean"] == pytest.approx(2.5)
    assert result["episodes"] == 2
    assert env.reset_seeds == [5, 6]


# ----------------------------------------------------------------------------
# `eosrl evaluate --video`.

def _gif_frames(path):
    from PIL import Image, ImageSequence
    with Image.open(path) as gif:
        return [(np.asarray(frame.convert("RGB")), frame.info.get("duration"))
                for frame in ImageSequence.Iterator(gif)]


def test_evaluate_video_gif_has_one_frame_per_step_of_the_first_episode(tmp_path, monkeypatch):
    """Breaks if the GIF misses or repeats frames, renders after the step instead of before,
    or records more than the first evaluation episode."""
    import eosrl.launch.evaluate as evaluate
    from eosrl.agents.learner import Learner
    lengths = (7, 3)
    script = [[(1.0, t == n - 1, False, {}) for t in range(n)] for n in lengths]
    config = load_config(CONFIGS / "dqn_cartpole.yaml", ["agent.hidden_sizes=[4]"])
    network = networks.make_network(config.agent, "gym", (4,), 2)  # CartPole's spec
    ckpt = Learner(network, config.agent, seed=3).save(tmp_path / "checkpoints", meta={"env_steps": 0})
    made = []

    def fake_make_env(env_config, seed, training=True, render_mode=None):
        assert render_mode == "rgb_array" and not training
        made.append(ScriptedEnv(script, obs_dim=4))
        return made[-1]
    import eosrl.launch.builder as builder  # evaluate makes its env through the Builder
    monkeypatch.setattr(builder, "make_env", fake_make_env)
    video = tmp_path / "out" / "episode.gif"
    record = evaluate.evaluate_checkpoint(config, ckpt, None, episodes=2, epsilon=0.0, video=str(video))
    assert len(made) == 1 and record["video"] == str(video)
    assert record["episode_length_mean"] == pytest.approx(np.mean(lengths))
    frames = _gif_frames(video)
    assert len(frames) == lengths[0]
    # Frame t shows the state before step t (value 20 t), enlarged from 5x5 to 200x200.
    assert [int(image[0, 0, 0]) for image, _ in frames] == [20 * t for t in range(lengths[0])]
    assert frames[0][0].shape == (200, 200, 3)


def test_gif_merges_repeated_frames_but_keeps_the_playback_time():
    """Breaks if save_gif changes the per-frame duration; documents that the GIF encoder
    (Pillow) merges identical consecutive renders, so the frame count equals the episode
    length only when consecutive renders differ."""
    from eosrl.launch.evaluate import save_gif
    import tempfile
    from pathlib import Path
    values = [10, 10, 30, 30, 30, 50]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "repeat.gif"
        save_gif([np.full((4, 4, 3), v, np.uint8) for v in values], path, fps=25)
        frames = _gif_frames(path)
    assert len(frames) == 3
    assert sum(duration for _, duration in frames) == 40 * len(values)
