"""eosrl: DQN, C51 and QR-DQN over Reverb, with spectral normalisation and Hessian probes
for studying the edge of stability in RL.

The source tree keeps its folders at the top (`agents/`, `envs/`, `launch/`);
setuptools installs them as `eosrl.agents`, `eosrl.envs` and `eosrl.launch`
(pyproject.toml's package-dir), so `eosrl` is the only name a user's
site-packages gains.
"""
import os

# TensorFlow (loaded by Reverb) prints start-up notices on import; every eosrl module is
# imported through this package, so this one line keeps them away from users.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
