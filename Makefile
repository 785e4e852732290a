# Two commands for a fresh machine (offline apart from the package registries):
#   make demo   installs the package and runs DN2 on scikit-learn's digits, printing the AUROC
#   make test   installs the package, its test extras and Debian's FashionMNIST, then runs the test suite
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install data demo test lint

install:
	$(PIP) install -q -e ".[dev]"

data:  # FashionMNIST gz files from Debian (used by tests, configs and benchmarks); needs root
	@test -d /usr/share/datasets/fashion-mnist || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; }

demo: install
	dn2 test --config configs/digits.yaml

test: install data
	$(PYTHON) -m pytest -q -rs

lint:
	ruff check dn2_lightning tests benchmarks notebooks && ruff format --check dn2_lightning tests benchmarks notebooks
