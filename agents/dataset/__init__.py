"""Offline-RL datasets on disk: the format, its streaming writer and reader, subsets and
corruption for data-regime experiments, and an importer for the DQN Replay Dataset.

A dataset is a directory with `meta.json` and shards `shard_00000.npz`, ... holding the
steps of episodes as single frames (a stacked observation is rebuilt from consecutive
rows, as in replay). docs/dataset_format.md specifies the layout; in short, row i holds
the newest frame of an observation and the action, raw reward and terminal/truncation
flags of the step taken from it; an episode starts with `frame_stack - 1` padding rows
(the older frames of its first observation) and ends with a row holding its final
observation and no action. Nothing is pickled: shards are `.npz` read with
`allow_pickle=False`, metadata is JSON.

* `DatasetWriter`: fed like `TransitionAdder` (`add_first` / `add`), writes a shard every
  `shard_size` rows as the run goes, each atomically (temp file, fsync, rename) and
  followed by an atomic rewrite of `meta.json`, so a crash loses at most the open shard.
* `DatasetReader`: validates the metadata and the files (sizes on open, sha256 checksums
  on open or lazily), streams episodes shard by shard, reports statistics, checks the env,
  and selects / corrupts subsets of transitions by global index.
* `replay_into`: pushes (selected, possibly corrupted) transitions into an adder.
* `import_dqn_replay`: converts Dopamine replay logs (Agarwal et al. 2020) checkpoint by
  checkpoint, streaming the observation arrays in chunks.

Files: format.py (constants, `DatasetError`, meta.json, env identity), writer.py,
reader.py, regimes.py (subsets, corruption), loading.py (`replay_into`), dqn_replay_plan.py (Dopamine
store files and per-checkpoint plans) and dqn_replay.py (the import). Every public name
is importable from `eosrl.agents.dataset`.
"""
from .dqn_replay import import_dqn_replay
from .dqn_replay_plan import DQN_REPLAY_LAYOUTS, DQN_REPLAY_STACK, dqn_replay_checkpoints
from .format import (DEFAULT_SHARD_SIZE, FORMAT_NAME, FORMAT_VERSION, MAX_REWARD_VALUES, META_FILE, ROW_FIELDS,
                     SHARD_ARRAYS, VERIFY_MODES, DatasetError, shard_name)
from .reader import DatasetReader, Episode
from .loading import replay_into
from .regimes import CORRUPT_FIELDS, REWARD_CORRUPTIONS, SELECT_MODES, Corruption
from .writer import DatasetWriter

__all__ = [
    "CORRUPT_FIELDS", "DEFAULT_SHARD_SIZE", "DQN_REPLAY_LAYOUTS", "DQN_REPLAY_STACK", "FORMAT_NAME",
    "FORMAT_VERSION", "MAX_REWARD_VALUES", "META_FILE", "REWARD_CORRUPTIONS", "ROW_FIELDS", "SELECT_MODES",
    "SHARD_ARRAYS", "VERIFY_MODES", "Corruption", "DatasetError", "DatasetReader", "DatasetWriter", "Episode",
    "dqn_replay_checkpoints", "import_dqn_replay", "replay_into", "shard_name",
]
