# The two commands the README names:
#   make demo        set up what the demo needs (scripts/setup.sh --demo: the package without extras and
#                    Fashion-MNIST), then train SGD and VAR on Fashion-MNIST, prune, report
#   make test        set everything up (scripts/setup.sh: test and dev extras, the data of every demo and
#                    test), check lint and types (make lint), build the docs strictly (make docs), then run
#                    the whole test suite (what CI runs: .ci/run), one worker per core
# For developers:
#   make lint        ruff (lint and format check) on src, tests, benchmarks and scripts, and mypy on
#                    src/varprune (configured in pyproject.toml); `make test` fails on any finding
#   make test-fast   the suite without the end-to-end tests marked `slow` (training runs, studies,
#                    the demo, subprocesses, SIGKILL/resume; see tests/conftest.py): minutes less
#   make gpu-data    copy Fashion-MNIST into .data/fashion-mnist (ignored by git) so it can travel
#                    to a machine without the Debian package (the GPU check's prep step)
#   make gpu-check   benchmarks/gpu_check.sh: every GPU speed figure in one bounded run (on a
#                    machine without CUDA it runs small sizes on the CPU)
#   make docs        the documentation site (mkdocs-material + mkdocstrings) into site/; --strict: a
#                    warning (a broken link or anchor, a docstring griffe cannot read) fails the build
#   make dist        the sdist and the wheel into dist/
.PHONY: setup setup-demo demo lint test test-fast bench gpu-data gpu-check docs dist

FMNIST ?= /usr/share/datasets/fashion-mnist

setup:
	bash scripts/setup.sh

setup-demo:
	bash scripts/setup.sh --demo

demo: setup-demo
	varprune demo

LINT_PATHS = src tests benchmarks scripts

lint:
	ruff check $(LINT_PATHS)
	ruff format --check $(LINT_PATHS)
	mypy

# lint and the strict docs build first (in their own make, after setup has installed ruff, mypy and mkdocs),
# so a lint or type error or a broken docs reference fails CI.
# -n auto: one pytest worker per core (xdist); --dist loadfile keeps a file's tests, and so its
# module fixtures (trained runs), on one worker. Each worker runs torch on one thread (conftest.py).
test: setup
	$(MAKE) lint docs
	python -m pytest -q -n auto --dist loadfile

test-fast:
	python -m pytest -q -n auto --dist loadfile -m "not slow"

bench: setup
	python benchmarks/bench_var_overhead.py

gpu-data:
	mkdir -p .data/fashion-mnist
	cp $(FMNIST)/*-ubyte.gz .data/fashion-mnist/
	@ls -l .data/fashion-mnist

gpu-check:
	PYTHONPATH=src bash benchmarks/gpu_check.sh

docs:
	NO_MKDOCS_2_WARNING=1 mkdocs build --strict -d site

# An isolated build (the default) installs setuptools into a fresh environment from pip's configured index;
# the version comes from varprune.__version__, read statically, so torch is not needed to build. On a machine
# with no index at all: python -m build --no-isolation (uses the setuptools installed here).
dist:
	python -m build --outdir dist .
