# Two commands on a fresh machine: `make train` and `make test`.
# Both create .venv with Python 3.11 (dm-reverb 0.14 has wheels for CPython 3.9-3.11 on
# x86-64 Linux only) and install the pinned stack from pyproject.toml.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-stamp
TRAIN_CONFIG ?= configs/dqn_minatar_breakout_quick.yaml
TRAIN_ACTORS ?= 2
SEED ?= 0
TRAIN_RUN ?= runs/dqn_minatar_breakout_quick$(if $(filter-out 0,$(SEED)),_seed-$(SEED))

.PHONY: install test test-fast typecheck train clean

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; eosrl needs Python 3.11 (dm-reverb 0.14 ships wheels for CPython 3.9-3.11 on x86-64 Linux). Install it or run 'make PYTHON=/path/to/python3.11'." >&2; exit 1; }
	@$(PYTHON) -c 'import sys, platform; ok = (3, 9) <= sys.version_info[:2] <= (3, 11) and platform.machine() == "x86_64"; sys.exit(0 if ok else "error: $(PYTHON) is Python %d.%d on %s; dm-reverb 0.14 needs CPython 3.9-3.11 on x86-64 Linux" % (sys.version_info[0], sys.version_info[1], platform.machine()))'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --quiet --upgrade "pip<25" setuptools wheel
	$(VENV)/bin/pip install --quiet --quiet -c constraints.txt -e ".[ray,dev]"
	@touch $(STAMP)

install: $(STAMP)

# The whole suite after the type checker, on two pytest-xdist workers: many tests mostly
# wait on the processes they start, so two at a time fill the 2 cores; tests marked with
# the xdist group "learning" (CPU-bound learning runs) all go to one worker, so no two of
# them share the cores (README, "Tests and benchmarks").
PYTEST_WORKERS ?= 2
test: install typecheck
	$(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=15

# The inner loop: everything but the tests marked slow (learning, launches, studies).
test-fast: install
	$(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup -m "not slow"

# mypy reads folders as packages, and ours install under other names (agents/ is
# eosrl.agents): it checks a tree of links laid out as the installed package.
typecheck: install
	@rm -rf build/typecheck && mkdir -p build/typecheck/eosrl
	@ln -s ../../../eosrl/__init__.py build/typecheck/eosrl/__init__.py
	@for p in agents envs launch; do ln -s ../../../$$p build/typecheck/eosrl/$$p; done
	cd build/typecheck && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p eosrl

# The first run, distributed: replay server, 2 actors, learner and evaluator as processes,
# DQN on MinAtar Breakout for 80k env steps (configs/dqn_minatar_breakout_quick.yaml; about
# 5 min of training on 2 cores, README "Set-up"), then its learning curve. `make train SEED=3`
# runs another seed into its own directory.
train: install
	$(VENV)/bin/eosrl launch $(TRAIN_CONFIG) --actors $(TRAIN_ACTORS) --overwrite \
	  --run-dir $(TRAIN_RUN) --set run.seed=$(SEED)
	@$(VENV)/bin/eosrl plot $(TRAIN_RUN) >/dev/null && echo "  learning curve: $(TRAIN_RUN)/plots/returns.png"

clean:
	rm -rf $(VENV) runs
