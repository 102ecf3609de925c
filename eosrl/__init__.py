"""eosrl: DQN and C51 over Reverb, with spectral normalisation and Hessian probes
for studying the edge of stability in RL.

The source tree keeps its folders at the top (`agents/`, `envs/`, `launch/`);
setuptools installs them as `eosrl.agents`, `eosrl.envs` and `eosrl.launch`
(pyproject.toml's package-dir), so `eosrl` is the only name a user's
site-packages gains.
"""
__version__ = "0.1.0"
