"""Agents: the agent kinds (DQN, C51, QR-DQN: head, loss, Q-values), networks, the learner, actors, replay,
probes and the builder that makes them from a config."""
