"""One factory for every environment eosrl trains on: Atari (ale-py), MinAtar and classic control.

`make_env` returns a gymnasium env with the 5-tuple API and a discrete action space whose
`info` always carries `life_loss` (a bool), so the actor can treat it as a bootstrapping
terminal without knowing the env family. Rewards are never clipped here: the actor clips
training rewards, and returns are reported raw.

Kinds and their protocols:

* `atari`: `ALE/<Game>-v5` with frame skip 4 (max-pooled over the last two frames), 84x84
  grayscale frames stacked on the last axis into uint8 (84, 84, 4) observations, the
  minimal action set, and the episode cap `env.max_episode_frames`. Presets:
  `dopamine` (Machado et al. 2018): sticky actions 0.25, no noop starts, life loss ignored;
  `nature` (Mnih et al. 2015): no sticky actions, 1-30 noop starts, and, when `training`,
  `info["life_loss"]` on steps where a life was lost (the episode itself goes on).
* `minatar`: the five MinAtar games, bool (10, 10, C) observations (MinAtar's own dtype:
  a quarter of float32's bytes in replay and datasets; the networks cast to float), with
  MinAtar's own defaults (sticky actions 0.1, difficulty ramping) and the full set of 6
  actions, as in the DQN baselines of the MinAtar paper (Young & Tian 2019).
* `gym`: `gymnasium.make(id)` for classic control (or any registered env with a Box
  observation and discrete actions), observations cast to float32.

Every env is deterministic given `seed`: the first `reset()` without a seed uses it.
"""
from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass
from typing import get_args

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation, TransformObservation

from eosrl.envs.config import AtariPreset, EnvConfig, EnvKind

ENV_KINDS = get_args(EnvKind)
ATARI_PRESETS = get_args(AtariPreset)
MINATAR_GAMES = ("asterix", "breakout", "freeway", "seaquest", "space_invaders")
# The discrete-action classic-control envs; other registered ids pass if their spaces fit.
CLASSIC_CONTROL_IDS = ("Acrobot-v1", "CartPole-v0", "CartPole-v1", "MountainCar-v0")

ATARI_FRAME_SIZE = 84
ATARI_FRAME_STACK = 4
ATARI_FRAME_SKIP = 4


class EnvError(ValueError):
    """An env config that cannot run; the one-line message names the field."""


@dataclass(frozen=True)
class EnvSpec:
    """What the agent and replay need to know about an env, without holding one open."""

    obs_shape: tuple
    """Shape of one observation as the agent sees it, e.g. (84, 84, 4) or (10, 10, 4)."""
    obs_dtype: np.dtype
    """uint8 for Atari, bool for MinAtar, float32 for classic control."""
    num_actions: int
    """Size of the discrete action space."""
    frame_shape: tuple
    """Shape of one frame as stored in replay: (84, 84) for Atari, `obs_shape` otherwise."""
    frame_stack: int
    """Frames per observation, stacked on the last axis: 4 for Atari, 1 otherwise."""


# ----------------------------------------------------------------------------
# Names: ids as users write them, resolved to the names the packages use.


def game_key(game_id: str) -> str:
    """Reduces `ALE/SpaceInvaders-v5`, `SpaceInvaders`, `space_invaders` to `spaceinvaders`.

    ROM ids are snake_case and gym names PascalCase, and neither converts to the other by
    rule (`tic_tac_toe_3d` is `TicTacToe3D`), so both sides are compared in this form.
    """
    name = game_id.strip().split("/")[-1]
    name = re.sub(r"-v\d+$", "", name)
    name = re.sub(r"(NoFrameskip|Deterministic)$", "", name)
    return re.sub(r"[^a-z0-9]", "", name.lower())


@functools.lru_cache(maxsize=1)
def _ale():
    """Imports ale-py once: silences its banner and registers the `ALE/` envs."""
    import ale_py

    # Every ALEInterface otherwise prints its version and "[Powered by Stella]" to stderr.
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
    gymnasium.register_envs(ale_py)
    return ale_py


@functools.lru_cache(maxsize=1)
def atari_games() -> dict:
    """ROM id -> registered `ALE/<Name>-v5` id, for every ROM ale-py ships with a v5 env.

    `ale_py.roms.get_all_rom_ids()` also lists a few two-player-only ROMs (combat, joust,
    maze_craze, warlords) that have no v5 env; those are left out.
    """
    ale = _ale()
    games = {}
    for rom in ale.roms.get_all_rom_ids():
        env_id = f"ALE/{ale.registration.rom_id_to_name(rom)}-v5"
        if env_id in gymnasium.registry:
            games[rom] = env_id
    return dict(sorted(games.items()))


def _atari_rom(game_id: str) -> str:
    by_key = {game_key(rom): rom for rom in atari_games()}
    rom = by_key.get(game_key(game_id))
    if rom is None:
        raise EnvError(f"env.id: unknown Atari game {game_id!r} (valid: {', '.join(atari_games())})")
    return rom


def _minatar_game(game_id: str) -> str:
    valid = ", ".join(MINATAR_GAMES)
    # minatar registers `MinAtar/<Game>-v1` as the minimal-action-set variant; taking it
    # silently with 6 actions would run a different problem than the id promises.
    if re.search(r"-v1$", game_id.strip()):
        raise EnvError(f"env.id: {game_id!r} is MinAtar's minimal-action-set variant; eosrl uses "
                       f"the full 6-action set, write the bare game name (valid: {valid})")
    game = {game_key(g): g for g in MINATAR_GAMES}.get(game_key(game_id))
    if game is None:
        raise EnvError(f"env.id: unknown MinAtar game {game_id!r} (valid: {valid})")
    return game


def _gym_id(env_id: str) -> str:
    namespace = env_id.split("/")[0].lower() if "/" in env_id else ""
    if namespace in ("ale", "minatar"):
        kind = "atari" if namespace == "ale" else "minatar"
        raise EnvError(f"env.id: {env_id!r} is not a gym env; set env.kind={kind} "
                       f"(gym ids: {', '.join(CLASSIC_CONTROL_IDS)})")
    if env_id not in gymnasium.registry:
        raise EnvError(f"env.id: unknown gym env {env_id!r} (valid: {', '.join(CLASSIC_CONTROL_IDS)}, "
                       f"or another registered gymnasium id with discrete actions)")
    return env_id


def validate_env_config(config: EnvConfig) -> None:
    """Raises EnvError for an unknown kind, game or preset without creating the env."""
    if config.kind not in ENV_KINDS:
        raise EnvError(f"env.kind: unknown value {config.kind!r} (valid: {', '.join(ENV_KINDS)})")
    if config.kind == "atari":
        _atari_rom(config.id)
        if config.preset not in ATARI_PRESETS:
            raise EnvError(f"env.preset: unknown value {config.preset!r} (valid: {', '.join(ATARI_PRESETS)})")
        if config.max_episode_frames <= 0:
            raise EnvError(f"env.max_episode_frames: must be > 0, got {config.max_episode_frames}")
    elif config.kind == "minatar":
        _minatar_game(config.id)
    else:
        _gym_id(config.id)


# ----------------------------------------------------------------------------
# Wrappers.


class _LifeLoss(gymnasium.Wrapper):
    """Sets `info["life_loss"]` on every reset and step; True only when tracking lives.

    With tracking (Atari, nature preset, training) it is True on steps where the ALE
    lives counter went down, including the last life, which also ends the episode.
    """

    def __init__(self, env: gymnasium.Env, track: bool):
        super().__init__(env)
        self._track = track
        self._lives = 0

    def _current_lives(self) -> int:
        return self.env.unwrapped.ale.lives() if self._track else 0  # type: ignore[attr-defined]

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._lives = self._current_lives()
        return obs, {**info, "life_loss": False}

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        lives = self._current_lives()
        life_loss, self._lives = lives < self._lives, lives
        return obs, reward, terminated, truncated, {**info, "life_loss": life_loss}


class _Float32Obs(gymnasium.ObservationWrapper):
    """Casts classic-control observations (float64 in gymnasium) to float32."""

    def __init__(self, env: gymnasium.Env):
        super().__init__(env)
        space = env.observation_space
        assert isinstance(space, spaces.Box)
        self.observation_space = spaces.Box(
            space.low.astype(np.float32), space.high.astype(np.float32), space.shape, np.float32)

    def observation(self, observation):
        return np.asarray(observation, dtype=np.float32)


class _SeedOnFirstReset(gymnasium.Wrapper):
    """Seeds the first `reset()` that comes without a seed, so `make_env(seed)` alone fixes
    every episode that follows (later resets continue the seeded random streams)."""

    def __init__(self, env: gymnasium.Env, seed: int):
        super().__init__(env)
        self._pending_seed = seed
        env.action_space.seed(seed)

    def reset(self, *, seed=None, options=None):
        if seed is None:
            seed = self._pending_seed
        self._pending_seed = None
        return self.env.reset(seed=seed, options=options)


# ----------------------------------------------------------------------------
# Building each kind.


def _make_atari(config: EnvConfig, training: bool, render_mode: str | None) -> gymnasium.Env:
    rom = _atari_rom(config.id)
    nature = config.preset == "nature"
    env = gymnasium.make(
        atari_games()[rom],
        frameskip=1,  # AtariPreprocessing skips frames itself, max-pooling the last two
        repeat_action_probability=0.0 if nature else 0.25,
        full_action_space=False,
        max_num_frames_per_episode=config.max_episode_frames,
        render_mode=render_mode,
    )
    env = AtariPreprocessing(env, noop_max=30 if nature else 0, frame_skip=ATARI_FRAME_SKIP,
                             screen_size=ATARI_FRAME_SIZE, terminal_on_life_loss=False,
                             grayscale_obs=True, scale_obs=False)
    env = _LifeLoss(env, track=nature and training)
    # The reset frame repeated fills the first stack; the stack goes last, as the networks expect.
    env = FrameStackObservation(env, ATARI_FRAME_STACK, padding_type="reset")
    stacked = spaces.Box(0, 255, (ATARI_FRAME_SIZE, ATARI_FRAME_SIZE, ATARI_FRAME_STACK), np.uint8)
    return TransformObservation(env, lambda obs: np.moveaxis(np.asarray(obs), 0, -1), stacked)


def _import_minatar_gym():
    # Importing minatar imports matplotlib.pyplot and seaborn for its renderer; under
    # pytest or -W default their pyparsing deprecation warnings reach users as noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import minatar.gym
    return minatar.gym


def _make_minatar(config: EnvConfig, render_mode: str | None) -> gymnasium.Env:
    game = _minatar_game(config.id)
    return _import_minatar_gym().BaseEnv(game, render_mode=render_mode, use_minimal_action_set=False)


def _make_gym(config: EnvConfig, render_mode: str | None) -> gymnasium.Env:
    env = gymnasium.make(_gym_id(config.id), render_mode=render_mode)
    if not isinstance(env.action_space, spaces.Discrete) or not isinstance(env.observation_space, spaces.Box):
        env.close()
        raise EnvError(f"env.id: {config.id!r} has {type(env.observation_space).__name__} observations and "
                       f"{type(env.action_space).__name__} actions; eosrl needs Box and Discrete "
                       f"(valid: {', '.join(CLASSIC_CONTROL_IDS)})")
    if env.observation_space.dtype != np.float32:
        env = _Float32Obs(env)
    return env


def make_env(config: EnvConfig, seed: int, training: bool = True,
             render_mode: str | None = None) -> gymnasium.Env:
    """Builds the env `config` describes, seeded with `seed`.

    `training` only matters for the Atari nature preset: it turns on `info["life_loss"]`
    (evaluation episodes report no life losses). Every kind sets `info["life_loss"]`.
    """
    validate_env_config(config)
    if config.kind == "atari":
        env = _make_atari(config, training, render_mode)
    else:
        env = _make_minatar(config, render_mode) if config.kind == "minatar" else _make_gym(config, render_mode)
        env = _LifeLoss(env, track=False)
    return _SeedOnFirstReset(env, seed)


def frame_stack(config: EnvConfig) -> int:
    """Frames stacked into one observation: 4 for Atari, 1 otherwise."""
    return ATARI_FRAME_STACK if config.kind == "atari" else 1


def frame_shape(config: EnvConfig) -> tuple:
    """Shape of one frame as stored in replay: (84, 84) for Atari, else the observation shape."""
    if config.kind == "atari":
        return (ATARI_FRAME_SIZE, ATARI_FRAME_SIZE)
    return env_spec(config).obs_shape


@functools.lru_cache(maxsize=None)
def _spec(kind: EnvKind, env_id: str, preset: AtariPreset, max_episode_frames: int) -> EnvSpec:
    config = EnvConfig(kind=kind, id=env_id, preset=preset, clip_rewards=False,
                       max_episode_frames=max_episode_frames)
    env = make_env(config, seed=0)
    try:
        obs_space, action_space = env.observation_space, env.action_space
    finally:
        env.close()
    assert isinstance(action_space, spaces.Discrete) and obs_space.shape is not None
    num_actions = int(action_space.n)
    obs_shape = tuple(obs_space.shape)
    stack = frame_stack(config)
    return EnvSpec(obs_shape=obs_shape, obs_dtype=np.dtype(obs_space.dtype), num_actions=num_actions,
                   frame_shape=obs_shape[:-1] if stack > 1 else obs_shape, frame_stack=stack)


def env_spec(config: EnvConfig) -> EnvSpec:
    """Shapes, dtype and action count of the env, from creating it once and closing it."""
    return _spec(config.kind, config.id, config.preset, config.max_episode_frames)
