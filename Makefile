# esdbs_ray: `make demo` runs the whole method on Fashion-MNIST; `make test` runs the tests.
# Both do all set-up first (idempotent): a virtual environment with the package and the data.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist
STAMP  := $(VENV)/.installed

.PHONY: setup data demo test test-long bench clean-venv

setup: $(STAMP) data

# Reinstall when the dependencies change. pip takes torch/torchvision from the range in
# pyproject.toml (on our machines: the 2.14.1 / 0.29.1 wheels on local disk).
# pip runs with -qq: errors still show, but not the machine's index warnings or setuptools' notes.
# pip byte-compiles the 17,000 files it installs one after another; compileall -j 0 does it on every
# core (fresh venv, 2 cores: 137.6 s for pip alone against 78.6 + 30.9 s).  Byte-compiling is only a
# speed-up, so its one expected failure (torch/testing/_internal/py312_intrinsics.py, Python 3.12
# syntax, which pip skips the same way) does not fail the set-up.  It matters most where
# PYTHONDONTWRITEBYTECODE is set (many container images; our VMs): Python then never caches what it
# compiles, and every process -- each Ray worker too -- compiles every module it imports again
# (the test suite, pip --no-compile alone: 568 s against 338 s with the byte-compiled venv).
$(STAMP): pyproject.toml
	@echo "setup: $(VENV) with esdbs-ray and its dependencies (the first time takes ~2 min: torch is large)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -qq --no-compile -e '.[test]'
	@$(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null 2>&1 || true
	@touch $(STAMP)
	@echo "setup: done"

# Fashion-MNIST: Debian's package when we are root with apt, else torchvision's download when
# online, else say how to get it. ESDBS_DATA or --data-dir point elsewhere.
data: $(STAMP)
	@if [ -n "$$ESDBS_DATA" ] || [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
		echo "data: Fashion-MNIST present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) && echo "data: installed dataset-fashion-mnist"; \
	else \
		$(PY) -c "import os, torchvision; torchvision.datasets.FashionMNIST(os.path.expanduser('~/.cache/torchvision'), download=True); torchvision.datasets.FashionMNIST(os.path.expanduser('~/.cache/torchvision'), train=False, download=True)" \
		|| { echo "data: Fashion-MNIST not found. Install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or put the four idx .gz files in a directory and set ESDBS_DATA=DIR." >&2; exit 1; }; \
	fi

# A second `make demo` replaces runs/demo: the previous run is moved aside to runs/demo.replaced-<time>
# (one line says so), never deleted.
demo: setup
	$(VENV)/bin/esdbs run --preset quick --out runs/demo --force

# Two pytest-xdist workers, a test file per worker (--dist loadfile: its module-scoped Ray clusters stay
# in one process); the workers share one smoke run (tests/conftest.py); each trains on one thread.
# The heaviest checks (marked long: trained BasisConv report sections, concurrent kernel builds, the
# two-node cluster, ...) keep make test, set-up included, under 10 minutes on 2 cores; make test-long
# runs them.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not long" --durations 15

test-long: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m long --durations 15

bench: setup
	$(PY) bench/throughput.py

clean-venv:
	rm -rf $(VENV)
