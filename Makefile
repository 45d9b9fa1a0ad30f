# The two commands the README names:
#   make demo   set everything up, then train SGD and VAR on Fashion-MNIST, prune, report
#   make test   set everything up, then run the test suite
.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

demo: setup
	varprune demo

test: setup
	python -m pytest -q

bench: setup
	python benchmarks/bench_var_overhead.py
