# One virtual environment at .venv for people, tools and CI.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-loss test bench bench-quick clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt -e '.[test,pipeline,bench]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m unicom.demo --config configs/demo.yaml

demo-loss: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow and not gpu"

bench-quick: $(STAMP)
	$(PY) -m benchmarks.bench_loss --preset quick

bench: $(STAMP)
	$(PY) -m benchmarks.bench_loss --preset cpu

clean:
	rm -rf $(VENV) build *.egg-info
