# Set-up is two commands on a fresh machine: `make demo` and `make test`.
# torch is pinned: on these machines torch==2.13.0 is the CPU wheel already on disk,
# while an unpinned torch would pull a CUDA build of several GB.
PY ?= python3

.PHONY: install demo test bench

install:
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"

demo: install
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/bench_runtime.py
