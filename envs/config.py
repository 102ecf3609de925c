"""The environment's section of a run config (`env:`), with its allowed values.

It lives with the environments so that `eosrl.envs` needs nothing from the
agents: the agents' config (agents/config.py) embeds it, and its checks read the
allowed values from these `Literal` annotations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EnvKind = Literal["atari", "minatar", "gym"]
AtariPreset = Literal["dopamine", "nature"]


@dataclass
class EnvConfig:
    kind: EnvKind = "gym"
    """Environment family: `atari` (ale-py), `minatar` (the minatar package) or `gym` (classic control)."""
    id: str = "CartPole-v1"
    """Game or env id: `Pong` for atari, `breakout` for minatar, `CartPole-v1` for gym."""
    preset: AtariPreset = "dopamine"
    """Atari protocol: `dopamine` (sticky actions 0.25, no life-loss terminal, no noop starts) or
    `nature` (no sticky actions, up to 30 noop starts, life loss ends the learning episode)."""
    clip_rewards: bool = False
    """Clip training rewards to [-1, 1] (the DQN Atari protocol); returns are always reported unclipped."""
    max_episode_frames: int = 108_000
    """Atari episode cap in emulator frames (30 minutes at 60 fps)."""
