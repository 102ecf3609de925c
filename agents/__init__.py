"""Agents: networks, losses, the learner, actors, replay, probes and the builder that makes them from a config."""
