"""Environments: the factory for Atari (ale-py), MinAtar and classic control, their config section and scores."""
