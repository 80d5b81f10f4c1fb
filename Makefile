# `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest workers are not used: the suite is sized for 2 cores run sequentially.
PYTEST_ARGS ?= -q

.PHONY: install test demo clean-demo

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt setup.py scripts/install_detectron2.sh | $(PY)
	$(PY) -m pip install -r requirements.txt
	bash scripts/install_detectron2.sh $(PY)
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS) tests

demo: install
	$(PY) tools/run_demo.py --output output/demo

clean-demo:
	rm -rf output/demo
