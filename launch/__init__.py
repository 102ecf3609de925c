"""The `eosrl` command and what runs a run: the in-process loop, the roles and launchers, studies, plots."""
