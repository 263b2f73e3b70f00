# leaktap — `make run` starts the agent, `make test` runs the whole suite.
# Both set up whatever is missing first (scripts/setup.sh is idempotent).
# Quiet by default; V=1 for verbose.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

ifeq ($(V),1)
Q :=
else
Q := @
endif

.PHONY: setup run test lint perf clean

setup:
	$(Q)V=$(V) bash scripts/setup.sh

run: setup
	$(Q)$(VENV)/bin/leaktap run $(ARGS)

test: setup
	$(Q)$(PY) -m pytest $(if $(filter 1,$(V)),-v,-q) $(PYTEST_ARGS)

lint: setup
	$(Q)bash scripts/lint.sh

perf: setup
	$(Q)for b in perf/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	$(Q)rm -rf $(VENV) build *.egg-info .pytest_cache
