# radam_dist: two commands matter, `make demo` and `make test`.
# Each builds .venv from nothing (Python 3.11, versions pinned in requirements.txt)
# and refreshes it when requirements.txt or pyproject.toml change.

PYTHON ?= python3.11
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.radam_dist-installed

.PHONY: venv demo test clean help tfa-reference
.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | sort

venv: $(STAMP)  ## create or refresh .venv

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml setup.py
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

# Capability-specific recipes (generated gRPC stubs, the Horovod build, ...).
-include mk/*.mk

# Two pytest processes by default, each taking whole test files (module fixtures start their
# clusters once); most tests wait on subprocesses, so two overlap well even on 2 cores.
# PYTEST_JOBS=0 runs everything in one process.
PYTEST_JOBS ?= 2

test: $(STAMP) $(TEST_PREREQS)  ## run the test suite
	$(VPY) -m pytest tests -n $(PYTEST_JOBS) --dist loadfile $(PYTEST_ARGS)

demo: $(STAMP) $(DEMO_PREREQS)  ## train the demo model and write out/
	$(VPY) -m examples.demo $(DEMO_ARGS)

TFA_VENV := .venv-tfa

$(TFA_VENV)/.installed: requirements-tfa.txt
	@test -x $(TFA_VENV)/bin/python || $(PYTHON) -m venv $(TFA_VENV)
	$(TFA_VENV)/bin/python -m pip install -q -r requirements-tfa.txt
	@touch $@

tfa-reference: $(TFA_VENV)/.installed  ## regenerate tests/data/tfa_reference.json with tfa 0.23 itself
	$(TFA_VENV)/bin/python tests/data/make_tfa_reference.py --out tests/data/tfa_reference.json

clean:  ## remove build outputs (keeps .venv)
	rm -rf out build dist *.egg-info .pytest_cache
