"""The weight layers of each network, by name, and which of them spectral
normalisation selects: plain Python, no JAX, so that reading a config can check
`agent.spectral_norm.layers` against the network it names (launch/config.py,
`validate`) before anything is built. agents/networks.py builds the layers under
these names; agents/spectral_norm.py normalises the selected ones.
"""
from __future__ import annotations

from typing import List, Sequence

from eosrl.agents.config import AgentConfig, ConfigError


def resolve_network(agent: AgentConfig, env_kind: str) -> str:
    """`agent.network`, with `auto` chosen from the env kind."""
    if agent.network != "auto":
        return agent.network
    return {"atari": "nature_cnn", "minatar": "minatar_cnn"}.get(env_kind, "mlp")


def layer_names(network: str, hidden_sizes: Sequence[int]) -> List[str]:
    """The weight layers of `network`, from input to output."""
    if network == "mlp":
        return [f"dense_{i}" for i in range(len(hidden_sizes))] + ["head"]
    if network == "minatar_cnn":
        return ["conv_0", "dense_0", "head"]
    if network == "nature_cnn":
        return ["conv_0", "conv_1", "conv_2", "dense_0", "head"]
    raise ValueError(f"agent.network: unknown network {network!r}")


def resolve_layers(spec: str, layer_names: Sequence[str]) -> tuple:
    """Layer names selected by `spec` ("-2", "-2,-3", "dense_0", "all", "none")."""
    spec = str(spec).strip()
    if spec in ("", "none"):
        return ()
    if spec in ("all", "full"):
        return tuple(layer_names)
    chosen = []
    for token in (t.strip() for t in spec.split(",")):
        if token in layer_names:
            chosen.append(token)
            continue
        try:
            index = int(token)
        except ValueError:
            index = None
        if index is None or index >= 0 or -index > len(layer_names):
            raise ConfigError(
                f"agent.spectral_norm.layers: {token!r} is not a layer of this network "
                f"(layers from input to output: {', '.join(layer_names)}; use negative "
                f"indices -1..-{len(layer_names)}, names, 'all' or 'none')")
        chosen.append(layer_names[index])
    return tuple(n for n in layer_names if n in chosen)


def selected_layers(agent: AgentConfig, env_kind: str) -> tuple:
    """The layers `agent.spectral_norm.layers` selects in the agent's network for `env_kind`;
    ConfigError when one is not a layer of it."""
    return resolve_layers(agent.spectral_norm.layers,
                          layer_names(resolve_network(agent, env_kind), agent.hidden_sizes))
