.PHONY: install test lint type main bench

install:  ## CPU torch first (never a CUDA build), then the package with dev tools
	pip install torch==2.13.0 -e ".[dev]"

test:
	python -m pytest

lint:
	ruff check .

type:
	mypy agentstate

main:
	agentstate run trace-patterning --learner columnar --streams 8 --independent --steps 1000000 --out runs/trace-patterning

bench:
	agentstate bench --json benchmarks/bench.json
