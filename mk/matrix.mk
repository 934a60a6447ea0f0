# The support matrix (issue 24, noxfile.py): the built wheel with [ps] in a clean venv per
# (Python, TensorFlow) pair under .venv-matrix/, tested from outside the checkout. Needs
# python3.10 .. python3.13 (on PATH or from pyenv) and PyPI; TensorFlow downloads are large.
#   make matrix      every pair, all of the core, strategy, state-layout and PS files (hours)
#   make matrix-ci   the diagonal .ci/run runs: every TF minor and every Python once, a subset
#   MATRIX_ARGS='-s "pair(3.12-2.18)"' make matrix     one pair; MATRIX_TESTS=quick for the subset

NOX := $(VENV)/bin/nox
MATRIX_ARGS ?= -s pair

.PHONY: matrix matrix-ci
matrix: $(STAMP)  ## the (Python, TensorFlow) support matrix from the wheel (hours)
	$(NOX) $(MATRIX_ARGS)

matrix-ci: $(STAMP)  ## CI's diagonal of the matrix: every TF 2.16..2.21 and Python 3.10..3.13
	$(NOX) -s diagonal
